"""InRank (Zhao et al. 2023): W = W0 + U Vt, factor ranks grown while the spectrum of U Vt asks for more."""

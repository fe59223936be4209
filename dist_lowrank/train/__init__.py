"""`dist-lowrank train`: the reference training job (config, tasks, loop)."""

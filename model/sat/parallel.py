"""sat's model-parallel state, for code outside model/sat (the trainer) that must not import sat."""
from sat import mpu


def init_model_parallel(size: int = 1):
    """Initialise sat's model-parallel groups once (over the existing torch.distributed group); return
    sat's mpu module, which DeepSpeed's activation checkpointing takes as its model-parallel unit."""
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(size)
    return mpu

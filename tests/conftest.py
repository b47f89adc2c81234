"""Shared test settings."""
import torch

# Denormal floats (tiny Adam moments, zero-initialised layers) make CPU ops up to 10x slower;
# the training loop and the sampler flush them too.
torch.set_flush_denormal(True)

# One thread: predictable on shared or busy CI machines, where two OpenMP threads competing with other
# processes were measured 20x slower than one; subprocess tests set OMP_NUM_THREADS=1 as well.
torch.set_num_threads(1)

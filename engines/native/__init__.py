"""lowbit's own engine on PyTorch (and Triton on GPUs), in the spirit of nano-vllm.

`engine.py` owns a thread and the per-request queues; `scheduler.py` decides what runs each
step; `block_manager.py` owns the paged KV blocks; `model_runner.py` owns every tensor;
`sequence.py` is one request's state. The scheduler and block manager import no torch.
"""

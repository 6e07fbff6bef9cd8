"""Page-locking host memory for DMA: cudaHostRegister / cudaHostUnregister through torch's cudart.
The only file that touches the CUDA runtime's C ABI."""
import torch

CUDA_HOST_REGISTER_DEFAULT = 0


def host_register(ptr: int, size: int):
    err = torch.cuda.cudart().cudaHostRegister(ptr, size, CUDA_HOST_REGISTER_DEFAULT)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister({size} bytes) failed with CUDA error {int(err)}")


def host_unregister(ptr: int):
    torch.cuda.cudart().cudaHostUnregister(ptr)

"""smartrun: start `vllm serve` with flags that fit the machine and the model, inside hard bounds."""

__version__ = "0.1.0"

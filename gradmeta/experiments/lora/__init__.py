"""Tasks ``lora_zoo`` (finetune a digits MLP with PEFT into a LoRA zoo), ``lora_llama_zoo`` (random-factor
adapters of a tiny Llama with spectral labels) and ``lora_predict``."""
from .predict import lora_predict
from .zoo import lora_llama_zoo, lora_zoo

__all__ = ["lora_zoo", "lora_llama_zoo", "lora_predict"]

"""Tasks ``lora_zoo`` (finetune a digits MLP with PEFT into a LoRA zoo) and ``lora_predict``."""
from .predict import lora_predict
from .zoo import lora_zoo

__all__ = ["lora_zoo", "lora_predict"]

"""Tasks ``lora_zoo`` (finetune a digits MLP with PEFT into a LoRA zoo), ``lora_llama_zoo`` (random-factor
adapters of a tiny Llama with spectral labels), ``lora_char_lm_zoo`` (a char-level transformer LM
finetuned on docstring sources) and ``lora_predict``."""
from .char_lm_zoo import lora_char_lm_zoo
from .predict import lora_predict
from .zoo import lora_llama_zoo, lora_zoo

__all__ = ["lora_zoo", "lora_llama_zoo", "lora_char_lm_zoo", "lora_predict"]

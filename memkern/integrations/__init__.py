"""Bridges to other libraries, each in its own module and imported only on request:
``memkern.integrations.hf`` (transformers) and ``memkern.integrations.peft`` (PEFT LoRA).
``import memkern`` never imports them."""

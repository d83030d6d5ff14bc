"""The language model: base loading in 4-bit (`model`), instruction data (`data`), LoRA
adapters (`adapters`) and training / evaluation steps (`train`).

bitsandbytes is imported here, before peft or transformers can, without the compiler it
does not use (`memory.import_bitsandbytes`)."""

from fedapp.llm.memory import import_bitsandbytes

import_bitsandbytes()

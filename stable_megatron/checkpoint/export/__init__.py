"""Checkpoint export: the writers of a checkpoint's merged weights, one module per format, over
the read-only view of `checkpoint/view.py` (whose names, and the writers', are re-exported
here for the callers of this package):

- `export_safetensors`: the full state dict as one safetensors file with the config and the
  checkpoint's provenance in its metadata (`read_safetensors` reads it back);
- `export_hf_gpt2`: a Hugging Face GPT-2 directory with the tokenizer, for models GPT-2 can
  express (`hf_gpt2_blockers` names what it cannot);
- `export_hf_llama`: a Hugging Face Llama directory, likewise (`hf_llama_blockers`).

A model a format cannot express is refused with `NotExpressibleError`, naming the config fields.
"""


from stable_megatron.checkpoint.export.common import (  # noqa: F401  (re-exported)
    NotExpressibleError,
    _qkv_rows_to_blocks,
)
from stable_megatron.checkpoint.export.hf_gpt2 import (  # noqa: F401
    export_hf_gpt2,
    hf_gpt2_blockers,
    hf_gpt2_state_dict,
)
from stable_megatron.checkpoint.export.hf_llama import (  # noqa: F401
    export_hf_llama,
    hf_llama_blockers,
    hf_llama_state_dict,
)
from stable_megatron.checkpoint.export.safetensors_file import (  # noqa: F401
    export_safetensors,
    read_safetensors,
)
from stable_megatron.checkpoint.view import (  # noqa: F401  (the view's API)
    Checkpoint,
    TensorInfo,
    format_summary,
    load_into_model,
    merged_state_dict,
    open_checkpoint,
    read_tensors,
    summary,
    tokenizer_model_of,
)

"""Hugging Face checkpoints <-> the NNX model, streamed tensor by tensor.

    from coder_jax import hf
    model = hf.load("path/to/hf_dir", dtype=jnp.float32)
    logits = model(input_ids)
    hf.save(model, "out_dir", tokenizer="tokenizer.json")   # transformers' from_pretrained,
                                                             # AutoTokenizer and pipeline load it
    files = hf.load_tokenizer_files("path/to/hf_dir")  # its tokenizer.json, template, BOS/EOS ids

`load` builds each parameter with `jax.make_array_from_callback`, reading from memory-mapped
safetensors only the slice each device holds; `save` writes shard files one tensor at a time
into a directory beside the target and renames it into place only when everything is written;
it replaces only an earlier export (target.py), never a directory holding anything else.

The modules: read.py (load), write.py (save), config.py (config.json <-> ModelConfig), names.py
(Hub tensor names and layouts), safetensors_io.py, tokenizer_files.py, target.py (what `save`
may replace), seq_cls.py (the reward model as DeepseekV2ForSequenceClassification).
"""

from __future__ import annotations

from coder_jax.hf.errors import CheckpointError
from coder_jax.hf.read import (INDEX_NAME, SINGLE_NAME, build_model, load, load_config,
                               read_config_json, tensor_files)
from coder_jax.hf.target import check_target
from coder_jax.hf.tokenizer_files import TokenizerFiles, load_tokenizer_files
from coder_jax.hf.write import save, write_export

__all__ = ["CheckpointError", "INDEX_NAME", "SINGLE_NAME", "TokenizerFiles", "build_model",
           "check_target", "load", "load_config", "load_tokenizer_files", "read_config_json",
           "save", "tensor_files", "write_export"]

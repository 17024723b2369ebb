"""Random tiny transformers DeepseekV2ForCausalLM models: the independent oracle."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            topk_method="greedy", max_position_embeddings=512, rms_norm_eps=1e-6)


def random_hf_model(seed: int = 0, model_cls=DeepseekV2ForCausalLM, **overrides):
  """A random model whose weights are large enough that every path matters (norms != 1);
  model_cls: the causal LM, or e.g. DeepseekV2ForSequenceClassification (pass num_labels)."""
  torch.manual_seed(seed)
  model = model_cls(DeepseekV2Config(**{**BASE, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.15)
      else:
        p.uniform_(0.5, 1.5)
  return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())

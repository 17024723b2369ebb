"""The reward model after training: `load(dir)` -> a Scorer of (prompt, response) pairs.

    from coder_jax import reward
    scorer = reward.load("runs/tiny_reward_model")     # MODEL_DIR or an HF export
    scorer.score(prompts, responses)                   # np.ndarray float32, one logit per pair

Its data: `RewardData` (reward/data.py) reads pointwise or pairwise JSONL records, rendered as the
scorer renders them; `python -m coder_jax.reward build` writes such records from a policy's
samples labelled by the sandbox, `export` writes an HF DeepseekV2ForSequenceClassification and
`score` scores pairs on the command line. Training pieces live where every stage's do: the model
in coder_jax.model.reward, the objectives and held-out metrics in coder_jax.train.reward_losses,
the stage in coder_jax.stages.reward_model, the Hugging Face export in coder_jax.hf.seq_cls.
"""

from coder_jax.reward.data import RewardData, encode_pairs
from coder_jax.reward.scorer import Scorer, load

__all__ = ["RewardData", "Scorer", "encode_pairs", "load"]

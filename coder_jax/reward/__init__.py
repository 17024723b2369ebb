"""The reward model after training: `load(dir)` -> a Scorer of (prompt, response) pairs.

    from coder_jax import reward
    scorer = reward.load("runs/tiny_reward_model")     # MODEL_DIR or an HF export
    scorer.score(prompts, responses)                   # np.ndarray float32, one logit per pair

Training pieces live where every stage's do: the model in coder_jax.model.reward, the
objectives and held-out metrics in coder_jax.train.reward_losses, the Hugging Face export in
coder_jax.hf.seq_cls.
"""

from coder_jax.reward.scorer import Scorer, load

__all__ = ["Scorer", "load"]

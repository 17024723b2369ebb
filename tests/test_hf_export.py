"""An HF export is complete for transformers' users: AutoTokenizer encodes what coder_jax encodes,
the chat template is DeepSeek-Coder-V2-Instruct's, and pipeline("text-generation") generates the
same greedy tokens as `python -m coder_jax.decode`. Import keeps the tokenizer; the training
directory's tokenizer is the default; --overwrite never touches a training directory."""

import json
import os
import sysconfig

import pytest
import tokenizers
from flax import nnx
from transformers import AutoTokenizer, GenerationConfig, pipeline

from coder_jax import hf
from coder_jax.data import tokenizer as tk
from coder_jax.decode.__main__ import main as decode_main
from coder_jax.decode.generate import generate_ids
from coder_jax.hf.__main__ import main as hf_main
from coder_jax.model.config import get_config
from file_tree import tree
from random_params import random_model_state

# Written out, not imported from the code under test.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
PROMPTS = ["def fib(n):\n    if n < 2:", "import os\nfrom typing import"]
NEW = 16
EXPORT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"]


def train_small_tokenizer(path, vocab_size=512, n_files=60):
  root = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:n_files]
  texts = [open(os.path.join(root, n), encoding="utf-8").read() for n in names]
  tk.train_tokenizer(texts, vocab_size, str(path))
  return str(path)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return train_small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def model():
  # Wide random weights: clear-cut logits and routing, so greedy choices are not near-ties.
  graphdef, state = random_model_state(get_config("tiny"), seed=3)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def export(model, tok_path, tmp_path_factory):
  return hf.save(model, str(tmp_path_factory.mktemp("export") / "hf"), tokenizer=tok_path)


def test_export_holds_the_tokenizer_files(export, tok_path):
  assert sorted(os.listdir(export)) == EXPORT_FILES
  ours = tk.load_tokenizer(tok_path)
  bos, eos, pad = (ours.token_to_id(t) for t in (BOS, EOS, "<｜▁pad▁｜>"))
  gen = GenerationConfig.from_pretrained(export)
  assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (bos, eos, pad)
  with open(os.path.join(export, "config.json")) as fh:
    config = json.load(fh)
  assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos)
  with open(os.path.join(export, "tokenizer_config.json")) as fh:
    tc = json.load(fh)
  assert tc["add_bos_token"] is True and tc["add_eos_token"] is False
  files = hf.load_tokenizer_files(export)   # read back as import reads it
  assert files.path == os.path.join(export, "tokenizer.json")
  assert (files.bos_id, files.eos_id) == (bos, eos)
  assert files.chat_template == tc["chat_template"]
  assert files.generation == {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def test_autotokenizer_encodes_as_the_project_tokenizer(export, tok_path):
  ours = tk.load_tokenizer(tok_path)
  auto = AutoTokenizer.from_pretrained(export)
  raw = tokenizers.Tokenizer.from_file(os.path.join(export, "tokenizer.json"))
  bos = ours.token_to_id(BOS)
  assert (auto.bos_token, auto.eos_token, auto.pad_token) == (BOS, EOS, "<｜▁pad▁｜>")
  assert (auto.bos_token_id, auto.eos_token_id) == (bos, ours.token_to_id(EOS))
  for text in PROMPTS + ["x = 1234567890  # digits", "  tabs\t\tand\r\nCRLF", "café 😀 中文",
                         "def f():\n\n\n    return  None\n", "ends with " + EOS]:
    ids = ours.encode(text, add_special_tokens=False).ids
    assert auto(text)["input_ids"] == [bos] + ids, text   # BOS first, as decode's prompts
    assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
    assert raw.encode(text).ids == [bos] + ids, text   # for readers of tokenizer.json alone
    keep = dict(skip_special_tokens=False)
    assert auto.decode(ids, **keep) == ours.decode(ids, **keep)


def test_chat_template_is_deepseek_coder_v2_instructs(export):
  auto = AutoTokenizer.from_pretrained(export)
  chat = [{"role": "user", "content": "write fib"}, {"role": "assistant", "content": "def fib():"}]
  assert auto.apply_chat_template(chat, tokenize=False) == (
      f"{BOS}User: write fib\n\nAssistant: def fib():{EOS}")
  system = [{"role": "system", "content": "You are a coder."}] + chat
  assert auto.apply_chat_template(system, tokenize=False) == (
      f"{BOS}You are a coder.\n\nUser: write fib\n\nAssistant: def fib():{EOS}")
  assert auto.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == (
      f"{BOS}User: write fib\n\nAssistant:")


def test_pipeline_generates_what_decode_generates(export, model, tok_path, capsys):
  ours = tk.load_tokenizer(tok_path)
  bos, eos = ours.token_to_id(BOS), ours.token_to_id(EOS)
  prompt_ids = [[bos] + ours.encode(p, add_special_tokens=False).ids for p in PROMPTS]
  want = generate_ids(model, prompt_ids, max_new_tokens=NEW, temperature=0.0, eos_id=eos).tokens
  capsys.readouterr()
  decode_main(["--checkpoint", export, "--max_new_tokens", str(NEW), "--temperature", "0",
               "--json"] + [a for p in PROMPTS for a in ("--prompt", p)])
  cli = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
  pipe = pipeline("text-generation", model=export, dtype="float32")
  for p, ids, w, text in zip(PROMPTS, prompt_ids, want, cli):
    out = pipe(p, max_new_tokens=NEW, do_sample=False, return_tensors=True)
    got = out[0]["generated_token_ids"]
    assert got[:len(ids)] == ids                     # the pipeline's prompt: BOS + the same ids
    new = [t for t in got[len(ids):] if t != eos]    # decode leaves EOS out of its tokens
    assert new == w and len(w) > 0, (p, new, w)
    hf_text = pipe(p, max_new_tokens=NEW, do_sample=False, return_full_text=False)
    assert hf_text[0]["generated_text"] == text == ours.decode(w), p


def test_import_keeps_the_tokenizer_and_export_writes_it_back(export, tmp_path):
  ck, again = str(tmp_path / "ck"), str(tmp_path / "again")
  assert hf_main(["import", "--hf_dir", export, "--out", ck]) == 0
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert os.path.isfile(os.path.join(ck, name)), name
  assert hf_main(["export", "--checkpoint", ck, "--out", again]) == 0   # its tokenizer by default
  assert sorted(os.listdir(again)) == EXPORT_FILES
  for name in EXPORT_FILES:
    with open(os.path.join(export, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read(), name


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, tok_path):
  """A real two-step pretraining MODEL_DIR, with the tokenizer training copies there."""
  import gin
  from coder_jax.parallel.mesh import MeshConfig
  from coder_jax.stages.pretrain import pretrain
  from coder_jax.train.data import SyntheticData
  from coder_jax.train.optim import OptimizerConfig
  run = tmp_path_factory.mktemp("train") / "run"
  gin.clear_config()
  pretrain(model_dir=str(run), train_steps=2, batch_size=8, seq_len=16, data=SyntheticData(),
           mesh_config=MeshConfig(), compute_dtype="float32", checkpoint_every=2,
           async_checkpoints=False, optimizer_config=OptimizerConfig(learning_rate=3e-3,
                                                                      warmup_steps=2))
  with open(tok_path, "rb") as src, open(run / "tokenizer.json", "wb") as dst:
    dst.write(src.read())
  return str(run)


def test_train_dir_export_takes_its_tokenizer(train_dir, tok_path, tmp_path):
  out = str(tmp_path / "hf")
  assert hf_main(["export", "--train_dir", train_dir, "--out", out]) == 0
  assert sorted(os.listdir(out)) == EXPORT_FILES
  ours = tk.load_tokenizer(tok_path)
  auto = AutoTokenizer.from_pretrained(out)
  assert auto(PROMPTS[0])["input_ids"] == [ours.token_to_id(BOS)] + ours.encode(
      PROMPTS[0], add_special_tokens=False).ids
  assert hf.load(out).cfg.vocab_size == 512


def test_overwrite_never_touches_a_training_directory(train_dir, model, capsys):
  parent = os.path.dirname(train_dir)
  before, run_before = tree(parent), tree(train_dir)
  assert {"checkpoints/", "metrics.jsonl", "tokenizer.json"} <= set(run_before)
  attempts = {
      "the source itself": ["--train_dir", train_dir, "--out", train_dir],
      "inside the source": ["--train_dir", train_dir, "--out",
                            os.path.join(train_dir, "checkpoints")],
      "holding the source": ["--train_dir", train_dir, "--out", parent],
      "a training directory": ["--preset", "tiny", "--out", train_dir],
  }
  for why, args in attempts.items():
    assert hf_main(["export", *args, "--overwrite"]) == 2, why
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, (why, err)
    assert tree(parent) == before, why     # nothing written, nothing removed, no leftovers
  with pytest.raises(ValueError, match="training directory"):
    hf.save(model, train_dir, overwrite=True)
  assert tree(parent) == before

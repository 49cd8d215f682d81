"""Tests for fleet.demomodel: reproducible, atomic, idempotent builds that transformers loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.demomodel import MARKER_NAME, build_demo_model, demo_corpus, is_demo_model
from fleet.protocol.errors import ConfigError

EXPECTED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER_NAME,
}


def _digests(folder: Path) -> dict[str, str]:
    return {
        child.name: hashlib.sha256(child.read_bytes()).hexdigest()
        for child in sorted(folder.iterdir())
    }


class Builds:
    """The builds shared by this module's tests (each one takes about 5 s)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seed0 = build_demo_model(root / "seed0", seed=0)
        # A second build in a fresh interpreter: hash-map seeds differ between processes.
        self.seed0_again = root / "seed0-again"
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from fleet.demomodel import "
                "build_demo_model; build_demo_model(Path(sys.argv[1]), seed=0)",
                str(self.seed0_again),
            ],
            check=True,
        )
        # Seed 1 built over a copy of the seed-0 build: replaces an older demo build in place.
        self.seed1 = root / "seed1"
        shutil.copytree(self.seed0, self.seed1)
        build_demo_model(self.seed1, seed=1)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    for module in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(module)
    return Builds(tmp_path_factory.mktemp("demomodel"))


def test_build_writes_expected_files_and_no_leftovers(builds: Builds) -> None:
    assert {child.name for child in builds.seed0.iterdir()} == EXPECTED_FILES
    assert sorted(child.name for child in builds.root.iterdir()) == [
        "seed0",
        "seed0-again",
        "seed1",
    ]
    marker = json.loads((builds.seed0 / MARKER_NAME).read_text())
    assert marker == {"format": "fleet-demo-model", "format_version": 1, "seed": 0}


def test_same_seed_is_byte_identical(builds: Builds) -> None:
    assert _digests(builds.seed0) == _digests(builds.seed0_again)


def test_other_seed_changes_weights_only(builds: Builds) -> None:
    first, other = _digests(builds.seed0), _digests(builds.seed1)
    changed = {name for name in first if first[name] != other[name]}
    assert changed == {"model.safetensors", MARKER_NAME}
    assert is_demo_model(builds.seed1, seed=1)
    assert not is_demo_model(builds.seed1, seed=0)


def test_config_ids_match_tokenizer(builds: Builds) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(builds.seed0)
    config = AutoConfig.from_pretrained(builds.seed0)
    generation = GenerationConfig.from_pretrained(builds.seed0)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert ids == (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert len(tokenizer) == config.vocab_size == 2048
    assert tokenizer.model_max_length == 1024
    assert config.head_dim == 64
    assert config.tie_word_embeddings is False


def test_tokenizer_round_trips_and_starts_with_bos(builds: Builds) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builds.seed0)
    text = "Alice reads 42 books, naïve café 🚀\n\ttabs and  spaces!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Words from the training corpus compress well below one token per byte.
    sentence = demo_corpus(1)[0]
    assert len(tokenizer(sentence).input_ids) < len(sentence.encode()) / 2


def test_chat_template(builds: Builds) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builds.seed0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<s><|system|>\nBe brief.</s>\n<|user|>\nHello there</s>\n<|assistant|>\n")
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    assert closed == prompt.removesuffix("<|assistant|>\n")
    # Tokenized as vLLM does for chat: no extra special tokens, so exactly one BOS.
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_model_loads_and_gives_logits(builds: Builds) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builds.seed0)
    model = AutoModelForCausalLM.from_pretrained(builds.seed0)
    assert model.dtype == torch.float32
    ids = tokenizer("The river runs north", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()


def test_existing_build_is_returned_untouched(builds: Builds) -> None:
    before = {child.name: child.stat().st_mtime_ns for child in builds.seed0.iterdir()}
    inode = builds.seed0.stat().st_ino
    assert build_demo_model(builds.seed0, seed=0) == builds.seed0
    assert builds.seed0.stat().st_ino == inode
    assert {child.name: child.stat().st_mtime_ns for child in builds.seed0.iterdir()} == before


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a Fleet demo model"):
        build_demo_model(tmp_path, seed=0)
    assert [child.name for child in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_file_and_bad_seed(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        build_demo_model(target, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        build_demo_model(tmp_path / "model", seed=-1)


def test_missing_dependencies_raise_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"fleet-serving\[cpu\]"):
        build_demo_model(tmp_path / "model", seed=0)
    assert list(tmp_path.iterdir()) == []

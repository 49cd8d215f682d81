"""Build Fleet's tiny demo model: a random-weight Llama plus a byte-level BPE tokenizer, offline.

Tests, examples and ``fleet demo-model`` need a model that a real vLLM CPU engine can serve
without any network access. Its output is gibberish; what matters is that it behaves like a real
Llama checkpoint to vLLM: a float32 ``LlamaForCausalLM`` (hidden 128, 2 layers, 2 heads of
head_dim 64, vocab 2048) saved as safetensors, a tokenizer whose encodings start with ``<s>``, and
a jinja chat template for ``/v1/chat/completions``.

Guarantees:

* **Offline.** ``HF_HUB_OFFLINE=1`` is set for the build (transformers imported under it; the
  process's own setting is back afterwards), the tokenizer is trained here on a corpus generated
  in this module, and nothing is loaded by hub name.
* **Reproducible.** Two builds with the same seed are byte-identical, file for file, with the same
  torch/transformers/tokenizers versions (the tokenizer does not depend on the seed at all).
* **Atomic and idempotent.** A build is written into a hidden temporary folder beside ``path``
  and renamed into place with :func:`os.replace`, so an interrupted or concurrent build never
  leaves a half model. A folder that already holds a complete build with the same seed (its
  marker file, :data:`MARKER_NAME`, says so) is returned as is.

The heavy libraries (torch, transformers, tokenizers) come with the ``cpu`` extra and are
imported only when a build is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleet.protocol.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "MARKER_NAME",
    "build_demo_model",
    "demo_corpus",
    "is_demo_model",
]

FORMAT_VERSION = 1
"""Version of the build recipe; bump it whenever the files a build writes change."""

MARKER_NAME = "fleet-demo-model.json"
"""The marker file, written last, that names a complete build, its seed and format version."""

VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 1024
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # trained first: ids 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Role-tagged turns, each closed by ``</s>``; ``add_generation_prompt`` opens an assistant turn.

The template renders ``<s>`` itself, so chat prompts are tokenized without special tokens (as vLLM
does) and still start with exactly one BOS.
"""

_CORPUS_SEED = 20240601
_CORPUS_SENTENCES = 12000

_WORDS = """
the of and to in is was for on that with as by at from it his her their its an be this which or
are had not but have were one all they she he you we new more also who after two first would has
been other time there year years when can into some most over only these them may many between
during made used such three than him through where both then while later city state world people
part known under about war before since school team season place house life work family game
water light music night day home country river land story north south east west small large long
great early little old young high good best last next own right left same different important
number group system name point form side line area power case word fact hand head eye face body
mind heart voice king queen child children woman women man men friend father mother brother sister
road street town village island mountain forest field garden sea lake ocean sky sun moon star rain
snow wind fire stone tree flower bird horse dog cat fish book letter paper page table chair door
window wall floor room kitchen bed morning evening winter summer spring autumn week month hour
minute moment history science language market money price company office bank government court law
police army church doctor teacher student question answer problem idea reason example result change
interest service report study program computer network model data memory engine server request
cache token router signal message table queue worker cluster node socket packet stream channel
build run walk talk read write speak listen watch look see hear feel think know learn teach bring
carry hold keep give take make find leave come go stay turn open close begin start stop finish
play sing dance draw paint cook clean wash sleep wake dream hope wish want need like love help ask
tell show try move live die grow fall rise stand sit lie send receive buy sell pay spend save lose
win fight follow lead meet join pass change happen appear remain become seem allow include continue
consider provide create develop produce return increase reduce explain describe remember forget
quickly slowly quietly loudly happily sadly carefully easily simply really almost always never often
sometimes usually already still again together alone away back down here there now soon today
tomorrow yesterday perhaps maybe however therefore because although unless until whether either
neither each every few several much any no yes very too enough quite rather
red green blue yellow white black brown orange purple silver golden bright dark warm cold hot cool
soft hard heavy light strong weak fast slow quiet loud happy sad angry calm brave clever kind
gentle simple complex strange familiar beautiful ancient modern famous common rare empty full
open closed deep shallow wide narrow short tall thin thick sweet bitter fresh clean dirty rich poor
""".split()

_STARTS = tuple(
    "The A In On After Before When While Every Some Many Our Their This That Yesterday Today "
    "Tomorrow Once Later".split()
)
_NAMES = tuple(
    "Alice Bob Carol David Emma Frank Grace Henry Irene James Laura Michael Nora Oscar Paula "
    "Robert Sarah Thomas Victor William".split()
)
_ENDINGS = (".", ".", ".", "!", "?", ";", ":")


def demo_corpus(n_sentences: int = _CORPUS_SENTENCES) -> list[str]:
    """Generate the fixed English-like corpus the demo tokenizer is trained on.

    The corpus depends on nothing but ``n_sentences``: a private, constantly seeded RNG draws
    sentences from a word list written into this module, with names, numbers and punctuation, so
    byte-level BPE finds enough merges to fill the 2048-token vocabulary.

    Args:
        n_sentences: how many sentences (lines) to generate.

    Returns:
        The sentences, one per line, the same on every call and platform.
    """
    rng = random.Random(_CORPUS_SEED)
    lines: list[str] = []
    for _ in range(n_sentences):
        parts = [rng.choice(_STARTS)]
        for _ in range(rng.randint(5, 16)):
            roll = rng.random()
            if roll < 0.06:
                parts.append(rng.choice(_NAMES))
            elif roll < 0.12:
                parts.append(str(rng.randint(0, 2100)))
            elif roll < 0.15:
                parts.append(rng.choice(_WORDS) + ",")
            else:
                parts.append(rng.choice(_WORDS))
        lines.append(" ".join(parts) + rng.choice(_ENDINGS))
    return lines


def is_demo_model(path: Path, *, seed: int) -> bool:
    """Tell whether ``path`` holds a complete demo-model build with this seed and format.

    Args:
        path: the model folder.
        seed: the seed the build must have been made with.

    Returns:
        True when the marker file exists, parses, and names this seed and :data:`FORMAT_VERSION`.
    """
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format_version") == FORMAT_VERSION
        and marker.get("seed") == seed
    )


def build_demo_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny demo Llama and its tokenizer into ``path``, offline and reproducibly.

    The build goes into a hidden temporary folder beside ``path`` and is renamed into place, so
    ``path`` either holds a complete build or is left as it was. When ``path`` already holds a
    complete build with the same seed, nothing is built. A previous demo build with another seed
    or format is replaced; any other non-empty folder is refused rather than overwritten.

    Args:
        path: the folder to create (its parent is created if missing).
        seed: seeds the random weights; the same seed gives byte-identical files.

    Returns:
        ``path``, holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
        the tokenizer files, ``chat_template.jinja`` and the marker file.

    Raises:
        ConfigError: when ``seed`` is negative, when ``path`` exists and is not a folder or is a
            non-empty folder that is not a demo build, or when torch, transformers or tokenizers
            cannot be imported (install ``fleet-serving[cpu]``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "must be a non-negative integer")
    path = Path(path)
    if is_demo_model(path, seed=seed):
        return path
    _check_replaceable(path)
    with _hub_offline():
        libs = _import_libraries()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        try:
            _write_model(staging, seed=seed, libs=libs)
            _install(staging, path, seed=seed)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face hub off for the build only: the process (``fleet up``'s model store
    fetching ``hf://`` sources, say) gets its settings back afterwards, in the environment and
    in ``huggingface_hub.constants``, which the hub reads at import and then at each call."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            offline = (before["HF_HUB_OFFLINE"] or "").upper() in {"1", "ON", "YES", "TRUE"}
            setattr(constants, "HF_HUB_OFFLINE", offline)  # noqa: B010  (typed as read-only)


class _Libraries:
    """The heavy modules a build needs, imported once the build is known to be needed."""

    def __init__(self, torch: Any, transformers: Any, tokenizers: Any) -> None:
        self.torch = torch
        self.transformers = transformers
        self.tokenizers = tokenizers


def _import_libraries() -> _Libraries:
    """Import torch, transformers and tokenizers with the hub switched off.

    Returns:
        The imported modules.

    Raises:
        ConfigError: when one of them is not installed or fails to import.
    """
    try:  # under _hub_offline: huggingface_hub reads it at import; the build needs no network
        import tokenizers
        import torch
        import transformers
        from transformers import LlamaForCausalLM  # noqa: F401  (fails late in transformers 5)
    except ImportError as exc:
        raise ConfigError(
            "demo_model.dependencies",
            getattr(exc, "name", None) or str(exc),
            "building the demo model needs torch, transformers and tokenizers: "
            "install fleet-serving[cpu]",
        ) from exc
    return _Libraries(torch, transformers, tokenizers)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but a missing path, an empty folder or an older demo build.

    Args:
        path: the target folder.

    Raises:
        ConfigError: when ``path`` is a file, or a non-empty folder without a demo marker.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError("demo_model.path", str(path), "exists and is not a folder")
    if (path / MARKER_NAME).is_file() or not any(path.iterdir()):
        return
    raise ConfigError(
        "demo_model.path", str(path), "is a non-empty folder that is not a Fleet demo model"
    )


def _install(staging: Path, path: Path, *, seed: int) -> None:
    """Move a finished build from ``staging`` to ``path`` atomically.

    Args:
        staging: the complete build, on the same file system as ``path``.
        path: the target folder: missing, empty, or an older demo build.
        seed: the build's seed, to recognise a concurrent build that finished first.
    """
    try:
        os.replace(staging, path)
        return
    except OSError:
        # ``path`` is a non-empty folder: an older build, or a concurrent one that won.
        if is_demo_model(path, seed=seed):
            return
    _check_replaceable(path)
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.retired-", dir=path.parent))
    os.replace(path, retired / "old")
    try:
        os.replace(staging, path)
    except OSError:
        if not is_demo_model(path, seed=seed):
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _write_model(folder: Path, *, seed: int, libs: _Libraries) -> None:
    """Train the tokenizer, create the random model, save both, then write the marker.

    Args:
        folder: an empty folder to write into.
        seed: seeds the weights (the tokenizer does not depend on it).
        libs: torch, transformers and tokenizers.
    """
    tokenizer = _train_tokenizer(libs)
    transformers = libs.transformers
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch = libs.torch
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hf_logging = transformers.utils.logging
    progress_bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: the bar is only noise on stderr
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if progress_bar_was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    marker = {"format": "fleet-demo-model", "format_version": FORMAT_VERSION, "seed": seed}
    (folder / MARKER_NAME).write_text(
        json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    for child in folder.iterdir():  # readable by engines running as other users
        child.chmod(0o644)
    folder.chmod(0o755)


def _train_tokenizer(libs: _Libraries) -> Any:
    """Train the byte-level BPE tokenizer on :func:`demo_corpus` and wrap it for transformers.

    Args:
        libs: transformers and tokenizers.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>`` at ids 0/1/2, a BOS-prepending
        post-processor, ``model_max_length`` 1024 and :data:`CHAT_TEMPLATE`.
    """
    tk = libs.tokenizers
    backend = tk.Tokenizer(tk.models.BPE())
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(demo_corpus(), trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = tk.processors.Sequence(
        [
            tk.processors.ByteLevel(trim_offsets=False),
            tk.processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return libs.transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )

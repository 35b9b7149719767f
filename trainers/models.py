"""Base models: where a model id points, which layers a target preset means, and loading in 4/8/16 bits.

Model ids:
  ``org/name``         a Hugging Face Hub checkpoint (needs the Hub or a warm HF cache)
  ``/path/to/dir``     a local checkpoint directory (config.json + weights + tokenizer)
  ``random:<name>``    a bundled architecture config (``trainers/assets/models/<name>``) with seeded
                       random weights, written once as a real checkpoint so 4/8-bit quantization
                       follows exactly the path a downloaded checkpoint takes
  ``bundled:<name>``   a checkpoint shipped with its weights in ``trainers/assets/models/<name>``
                       (``desc-llama``, the offline demo's pretrained base)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from trainers.config import compute_dtype_name, uses_fast_kbit
from trainers.random_bases import random_checkpoint

ASSETS = Path(__file__).parent / "assets" / "models"
# Hub ids whose config we bundle, so --dry-run and validation work with no network.
BUNDLED_HUB_CONFIGS = {"openlm-research/open_llama_3b_v2": "open_llama_3b_v2"}
# Architectures without a tokenizer of their own borrow this one (token ids fit any vocab >= 1024).
FALLBACK_TOKENIZER = "tiny-llama"
ATTENTION_PAIRS = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv"), ("q_lin", "v_lin"))
FUSED_QKV = ("query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv", "W_pack")
GPU_SHARE_ENV = "LORA_SWEEP_GPU_SHARE"  # set by a trial that shares its GPU under a memory cap


class ModelError(Exception):
    """A model that cannot be resolved or loaded; the message is one line for the user."""


def bundled_names() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe instead of the Hub client's ~25 s of retries when there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _bundled_dir(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise ModelError(f"unknown bundled model 'random:{name}' (bundled: {', '.join(bundled_names())})")
    return path


def bundled_checkpoint(model_id: str) -> Path:
    """``bundled:<name>`` -> its directory, which must hold weights (not only a config, as random: needs)."""
    name = model_id.removeprefix("bundled:")
    shipped = [n for n in bundled_names() if (ASSETS / n / "model.safetensors").is_file()]
    if name not in shipped:  # a name, never a path: "bundled:../x" must not reach outside the assets
        raise ModelError(f"unknown bundled checkpoint '{model_id}' (bundled with weights: {', '.join(shipped)})")
    return ASSETS / name


def load_config(model_id: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config without its weights: local, HF cache, Hub, or bundled copy, in that order."""
    if model_id.startswith("bundled:"):
        return AutoConfig.from_pretrained(bundled_checkpoint(model_id))
    if model_id.startswith("random:"):
        return AutoConfig.from_pretrained(_bundled_dir(model_id.removeprefix("random:")))
    if Path(model_id).is_dir():
        try:
            return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read model config in {model_id}: {str(e).splitlines()[0]}") from None
    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass
    if hub_reachable():
        try:
            return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"model '{model_id}' not found on the Hub: {str(e).splitlines()[0]}") from None
    if model_id in BUNDLED_HUB_CONFIGS:
        return AutoConfig.from_pretrained(ASSETS / BUNDLED_HUB_CONFIGS[model_id])
    raise ModelError(
        f"model '{model_id}': the Hugging Face Hub is unreachable and no copy is cached; point the model at "
        f"a local checkpoint directory (--set model=/path/to/model) or use random:<name> "
        f"(bundled: {', '.join(bundled_names())})"
    )


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The architecture with no storage (seconds even for billions of parameters)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_names(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(qualified name, leaf name) of every layer LoRA can adapt: nn.Linear (incl. bitsandbytes) and GPT-2's Conv1D."""
    return [(q, q.rsplit(".", 1)[-1]) for q, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def resolve_targets(model: torch.nn.Module, targets) -> tuple[str, ...]:
    """Preset or explicit names -> the leaf module names PEFT will match, by inspecting the model.

    ``all_linear`` is every Linear leaf name including the output head (as the post's regex over
    ``model.modules`` found; PEFT's own "all-linear" leaves the head out). ``attention`` is the query
    and value projections (the post's q_proj, v_proj), or a fused qkv projection where the
    architecture has one (GPT-NeoX ``query_key_value``, GPT-2 ``c_attn``).
    """
    layers = linear_names(model)
    leaves = list(dict.fromkeys(leaf for _, leaf in layers))
    if targets == "all_linear":
        return tuple(leaves)
    if targets == "attention":
        attn = list(dict.fromkeys(
            leaf for q, leaf in layers if any(p in ("attn", "attention", "self_attn", "self_attention")
                                              or "attn" in p for p in q.split(".")[:-1])
        ))
        for pair in ATTENTION_PAIRS:
            if all(p in attn for p in pair):
                return pair
        fused = [leaf for leaf in attn if leaf in FUSED_QKV]
        if fused:
            return (fused[0],)
        raise ModelError(
            f"preset 'attention' found no query/value projection in {type(model).__name__} "
            f"(attention layers: {', '.join(attn) or 'none'}); list the module names instead"
        )
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ModelError(
            f"module '{missing[0]}' matches no Linear layer of {type(model).__name__} (its layers: {', '.join(leaves)})"
        )
    return tuple(targets)


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,  # scaling alpha/sqrt(r) instead of alpha/r
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


# ---- loading for a trial (needs weights) ---------------------------------------------------------

def materialize_random(name: str, seed: int) -> Path:
    """Write ``random:<name>`` with seed ``seed`` as a checkpoint once; reuse it afterwards.

    Trials that start together wait on a file lock for the first one to write it (a 3B model is
    6 GB: building it once per trial would multiply the disk writes and GPU memory); it is written
    to a private temp dir and renamed into place, so a crash never leaves half a checkpoint.
    """
    import fcntl

    src = _bundled_dir(name)
    final = random_checkpoint(name, seed)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (final / "config.json").is_file():  # another trial wrote it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        # Ray gives a trial one CPU thread (OMP_NUM_THREADS=1); a random 3B base initialized by one thread took
        # ~2 minutes of every packed trial's setup on an H200 host (the others wait on the lock meanwhile), so
        # the build borrows every core for the seconds it lasts.
        threads = torch.get_num_threads()
        try:
            torch.manual_seed(seed)
            torch.set_num_threads(os.cpu_count() or threads)
            with torch.device(_build_device()):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
            model.save_pretrained(tmp)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the whole bf16 model back before this trial loads its own base
            tok_src = src if (src / "tokenizer.json").is_file() else ASSETS / FALLBACK_TOKENIZER
            for f in [*tok_src.glob("tokenizer*"), *tok_src.glob("chat_template*")]:
                shutil.copy(f, tmp / f.name)
            os.replace(tmp, final)
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_device() -> str:
    """Where to initialize a random base: the GPU (about 10x faster for billions of parameters) unless this
    process shares its GPU under a memory cap (trials packed by --gpus-per-trial auto), which a whole
    16-bit model could break (seen on an H200: the 0.09-GPU base row building the 3B model ran out)."""
    shared = float(os.environ.get(GPU_SHARE_ENV, "1")) < 1.0
    return "cuda" if torch.cuda.is_available() and not shared else "cpu"


def check_weights_available(model_id: str, trust_remote_code: bool = False) -> None:
    """Raise ModelError unless a trial could load this model's weights: bundled, random, local, Hub or cache."""
    if model_id.startswith("bundled:") or Path(model_id).is_dir():
        path = bundled_checkpoint(model_id) if model_id.startswith("bundled:") else Path(model_id)
        check_local_checkpoint(path, trust_remote_code)
        return
    if model_id.startswith("random:") or hub_reachable():
        return
    try:  # a warm HF cache works offline
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_files_only=True, allow_patterns=["*.safetensors", "*.bin"])
    except Exception:  # noqa: BLE001 - any miss means the weights are not here
        raise ModelError(
            f"model '{model_id}': the Hugging Face Hub is unreachable and the weights are not cached; "
            "point the model at a local copy (--set model=/path/to/model)"
        ) from None


def check_local_checkpoint(path: Path, trust_remote_code: bool = False) -> None:
    """A local model directory holds weights (every shard its index names) and a tokenizer: a directory
    with only config.json passes the config check and would fail in every trial instead."""
    index = next((p for p in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json")
                  if p.is_file()), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"model directory {path}: {index.name} cannot be read") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"model directory {path}: weight file {missing[0]} named in {index.name} is missing")
    elif not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"model directory {path} holds no weights (*.safetensors or pytorch_model*.bin)")
    try:
        load_tokenizer(str(path), trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model directory {path}: no usable tokenizer ({first})") from None


def checkpoint_path(cfg) -> str:
    """Where from_pretrained reads weights: the Hub id, the local directory or the materialized random model."""
    if cfg.model.startswith("random:"):
        return str(materialize_random(cfg.model.removeprefix("random:"), cfg.seed))
    if cfg.model.startswith("bundled:"):
        return str(bundled_checkpoint(cfg.model))
    check_weights_available(cfg.model, cfg.trust_remote_code)
    return cfg.model


def compute_dtype(cfg) -> torch.dtype:
    """The dtype a trial computes in on its device (and a merged model is stored in)."""
    return getattr(torch, compute_dtype_name(cfg.device))


def quantization_config(bits: int, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if bits == 4:  # QLoRA: NF4 with double quantization, as in the post and the QLoRA paper
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:  # LLM.int8 base
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(cfg, path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The frozen base in ``cfg.bits``, on this trial's device (Ray already narrowed CUDA_VISIBLE_DEVICES),
    in the trial's compute dtype unless ``dtype`` says otherwise (export's fp32 merges)."""
    from trainers import attention, kbit

    dtype = dtype or compute_dtype(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(cfg.bits, dtype),
        dtype=dtype,
        device_map={"": 0} if cfg.device == "cuda" else {"": "cpu"},
        # the fast path's padding-free batches need attention that keeps examples apart (trainers/attention.py)
        attn_implementation=attention.register() if cfg.trainer == "fast" else None,
        trust_remote_code=cfg.trust_remote_code,
    )
    if uses_fast_kbit(cfg, cfg.bits):
        kbit.patch(model, dtype)
    elif cfg.bits == 4 and cfg.device != "cuda":
        # bitsandbytes 0.50 repacks a 4-bit weight in place for its AVX512-bf16 CPU kernel on the first call
        # without gradients (evaluation), and fails on a layer whose input width is not a multiple of its
        # 64-value blocks (desc-llama's 352-wide down_proj). Its generic CPU path computes the same product.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def prepare_kbit(model: torch.nn.Module, cfg, gradient_checkpointing: bool) -> torch.nn.Module:
    """PEFT's k-bit preparation (``prepare_model_for_kbit_training``: freeze the base, input gradients under
    checkpointing, the unquantized layers upcast to fp32), as the trial runs it.

    The fast path (``fast_kbit``) keeps the unquantized frozen layers (embeddings, norms, lm_head) in the
    compute dtype instead, as a 16-bit base trains: in fp32 they carried the whole residual stream in fp32,
    so every quantized and LoRA layer cast its input down and its output back up, and lm_head's 400 MB
    weight was cast again on every step; a profile on an H200 showed those casts as 28% of the step's
    GPU time (all-linear r8, 4-bit). The adapters stay fp32 (PEFT's autocast_adapter_dtype)
    and the step runs under bf16 autocast either way; the bench's eval-loss drift measures the difference.
    """
    from peft import prepare_model_for_kbit_training

    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if uses_fast_kbit(cfg, cfg.bits):
        for name, param in model.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = ""):
    """The checkpoint's tokenizer, with a pad token and, when the space gives one, its chat template."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # LLaMA tokenizers ship without one; the post pads with EOS
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tokenizer_path(model_id: str, checkpoint: str) -> str:
    """Where a trial's tokenizer comes from: the checkpoint's own, or for ``random:`` models the bundled one
    (not the materialized copy, which a cache written by an older version may hold without a chat template)."""
    if not model_id.startswith("random:"):
        return checkpoint
    src = _bundled_dir(model_id.removeprefix("random:"))
    return str(src if (src / "tokenizer.json").is_file() else ASSETS / FALLBACK_TOKENIZER)


def local_tokenizer(cfg):
    """The trial's tokenizer where it can be had without a download (bundled, a local directory, the HF
    cache), for the driver's checks; None for a Hub model that is not cached (the trial checks it then)."""
    path = tokenizer_path(cfg.model, cfg.model)
    try:
        if not Path(path).is_dir():
            path = snapshot_tokenizer(path)
        return load_tokenizer(path, cfg.trust_remote_code, cfg.chat_template)
    except (OSError, ValueError):
        return None


def snapshot_tokenizer(model_id: str) -> str:
    """The HF cache's copy of a Hub model's tokenizer files (OSError when it has none)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True, allow_patterns=["tokenizer*", "chat_template*",
                                                                                    "special_tokens_map.json"])
    except Exception as e:  # noqa: BLE001 - any miss means it is not cached
        raise OSError(str(e)) from None


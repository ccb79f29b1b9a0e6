"""The GPU path, checked on the CPU where it can be: the 4-bit configuration's dtypes (bitsandbytes'
CPU backend runs the same layers), out-of-memory in training (the error simulated), gated hub
models, no hub call at checkpoints, the probe riding in the fresh batch; and, on a machine with a
GPU only, the prepared check itself on a tiny model (tests marked cuda); training's reads of the
device, counted. The decoder's cache compaction, its out-of-memory retry and its reads of the
device are in test_decoder.py."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import intrinsic_self_improvement as isi
import support.decoder
import support.model
import support.tasks
from conftest import ROOT, one_line_error
from support import UsageError
from support.run_directory import save_checkpoint


@pytest.fixture(scope="module")
def four_bit_bf16(tiny_model_dir):
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--quantize", "4bit", "--precision", "bf16",
                            "--device", "cpu"])
    return support.model.load_language_model(cfg), cfg


def output_dtypes(model, run) -> dict:
    """The dtype of every module's (first) output while `run` runs, by module name."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        def hook(_, inputs, output, name=name):
            first = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(first):
                seen.setdefault(name, first.dtype)
        hooks.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def test_four_bit_computes_in_the_compute_dtype_with_norms_in_fp32(four_bit_bf16):
    """QLoRA's set-up: weights 4-bit, norms' weights fp32, embeddings, head and LoRA bf16; every
    activation (residual stream, attention, norms' outputs, LoRA) and the KV cache bf16. (peft's
    prepare_model_for_kbit_training made all of them fp32.)"""
    lm, _ = four_bit_bf16
    weights = {name: p.dtype for name, p in lm.model.named_parameters()}
    assert {d for n, d in weights.items() if "norm" in n} == {torch.float32}
    assert {d for n, d in weights.items() if "lora_" in n} == {torch.bfloat16}
    assert {d for n, d in weights.items() if "embed_tokens" in n or "lm_head" in n} == {torch.bfloat16}
    assert {d for n, d in weights.items() if n.endswith("base_layer.weight") or "mlp" in n} == {torch.uint8}
    cache = support.decoder.decode_cache(room=4)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    dtypes = output_dtypes(lm.model, lambda: lm.model(input_ids=ids, past_key_values=cache, use_cache=True))
    layers = [name for name in dtypes if name.rsplit(".", 1)[-1].isdigit()]
    assert len(layers) == 2 and len(dtypes) > 30
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} \
        == {torch.bfloat16}


def test_four_bit_bf16_training_step_has_finite_nonzero_lora_gradients(four_bit_bf16):
    lm, _ = four_bit_bf16
    lm.model.train()
    example = isi.command_example(lm.tokenizer, isi.Task("list the files in /tmp"), "ls /tmp")
    loss, _ = isi.completion_loss(lm.model, isi.collate([example], lm.tokenizer.pad_token_id))
    loss.backward()
    grads = [p.grad for n, p in lm.model.named_parameters() if "lora_B" in n]
    lm.model.zero_grad(set_to_none=True)
    lm.model.eval()
    assert torch.isfinite(loss) and len(grads) == 8
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_probe_rides_in_the_fresh_batch(tiny_model_dir, monkeypatch):
    """fresh_batch decodes the probe's tasks (greedy, one command each) in the batch's passes:
    the batch's records and the probe's equal those of running each alone, and the probe then
    costs no generate or invert pass of its own."""
    import dataclasses
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu", "--scorer", "lexical",
                            "--tasks", "4", "--candidates", "3", "--max-command-tokens", "10",
                            "--max-inversion-tokens", "10"])
    lm = support.model.load_language_model(cfg)
    lm = dataclasses.replace(lm, stop_ids=frozenset(range(0, len(lm.tokenizer), 7)))
    monkeypatch.setattr(isi, "is_usable_command", lambda command: bool(command.strip()))  # invert every command
    domain = support.tasks.builtin_domain("pentest")
    probe_tasks = isi.draw_tasks(domain, 3, isi.random.Random(0), distinct=True)
    tasks = isi.draw_tasks(domain, 4, isi.random.Random(isi.stage_seed(cfg.seed, "tasks", 2)),
                           exclude={t.text for t in probe_tasks})  # the batch's tasks, as fresh_batch draws them
    batch_alone = isi.run_stage(lm, None, cfg, tasks, copies=3, greedy=False, seed=isi.stage_seed(cfg.seed, "batch", 2),
                                label="b").records
    probe_alone = isi.run_stage(lm, None, cfg, probe_tasks, copies=1, greedy=True, seed=0, label="p").records
    real, passes = isi.generate, []

    def watched(lm, requests, **kwargs):
        passes.append(kwargs["desc"])
        return real(lm, requests, **kwargs)
    monkeypatch.setattr(isi, "generate", watched)
    folded, probe_judged = isi.fresh_batch(lm, None, None, cfg, domain, 2, probe_tasks)
    assert folded.records == batch_alone and probe_judged == probe_alone
    assert passes == ["batch 2 and probe: generate", "batch 2 and probe: invert"]
    assert sum(bool(r["reconstruction"]) for r in probe_judged + folded.records) > 6
    assert not {t.text for t in probe_tasks} & {r["task"] for r in folded.records}


def test_out_of_memory_in_training_names_the_flag(tiny_model_dir, monkeypatch):
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "2"])
    lm = support.model.load_language_model(cfg)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(isi, "share_loss", out_of_memory)
    with pytest.raises(UsageError, match=r"^out of memory training at --batch-size 2: lower --batch-size"):
        isi.train_adapter(lm, cfg, [(isi.Task("list /tmp"), "ls /tmp")] * 3, seed=0)
    assert lm.model.training is False


def hub_answers_gated(monkeypatch) -> list:
    """The hub, as transformers reaches it, answers 401 'gated' for every file; returns the calls."""
    import transformers.utils.hub
    from huggingface_hub.errors import GatedRepoError
    from huggingface_hub.utils import httpx
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(filename)
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        raise GatedRepoError(f"401 Client Error. Cannot access gated repo for url {url}. Access to model {repo_id} "
                             f"is restricted. You must have access to it and be authenticated to access it.",
                             response=httpx.Response(401, request=httpx.Request("GET", url)))
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_a_gated_model_is_one_line_saying_how_to_get_access(monkeypatch, tmp_path, capsys):
    calls = hub_answers_gated(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hub"))
    assert isi.main(["--model", "mistralai/Mistral-7B-Instruct-v0.2", "--device", "cpu",
                     "--output", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert calls and line == (
        "error: --model mistralai/Mistral-7B-Instruct-v0.2 is gated on the hub: accept its terms at "
        "https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2 while logged in there, then give this machine "
        "a token of that account (hf auth login, or HF_TOKEN=...)")


def test_a_checkpoint_asks_the_hub_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """peft's save_pretrained asks the hub whether the base model's config exists (to see if the
    vocabulary was resized) when the model came from a hub id and the hub is not off."""
    import huggingface_hub
    import peft.utils.other
    import peft.utils.save_and_load
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"])
    lm = support.model.load_language_model(cfg)
    lm.model.peft_config["default"].base_model_name_or_path = "mistralai/Mistral-7B-Instruct-v0.2"
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for module in (huggingface_hub, peft.utils.other, peft.utils.save_and_load):
        if hasattr(module, "file_exists"):
            monkeypatch.setattr(module, "file_exists", lambda *args, **kwargs: asked.append(args) or True)
    save_checkpoint(lm, tmp_path, 1, SimpleNamespace(records=[], timing={}), [])
    assert (tmp_path / "checkpoint_cycle_1" / "adapter_model.safetensors").is_file()
    assert asked == []


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_path(tmp_path):
    """bench/gpu_check.py on the CPU with a tiny model: every stage runs and writes its figures."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(out), "--scratch", str(tmp_path / "scratch")],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    check_figures(figures)
    # on the CPU (the same kernels for both paths) the decoder's greedy tokens are generate's, every one
    decoder = figures["decoder_vs_generate"]
    assert decoder["greedy_agreement"] == [decoder["steps"]] * decoder["prompts"], decoder


def test_the_gpu_checks_cli_stage_keeps_its_evidence_when_the_run_times_out(tmp_path):
    """A CLI invocation past --cli-timeout: recorded as 'timed out' with its time and what it had
    printed, no cycle completed, the second invocation not started, and the check goes on."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--stages", "cli",
                           "--cli-timeout", "3", "--out", str(out), "--scratch", str(tmp_path / "scratch")],
                          capture_output=True, text=True, timeout=300)
    figures = json.loads(out.read_text())
    assert figures["failed"] == [] and "finished" in figures, done.stdout[-2000:]
    cli = figures["cli"]
    assert cli["returncodes"] == ["timed out"] and cli["last_completed_cycle"] is None, cli
    assert cli["first_s"] >= 3 and "resumed_s" not in cli and isinstance(cli["first_tail"], str)


def test_the_gpu_check_skips_what_its_budget_cannot_fit(tmp_path):
    """--budget: the environment and the model's build always run; a stage whose estimate is
    more than what is left is skipped and listed with why, none is started, and the JSON says so."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--budget", "1",
                           "--out", str(out), "--scratch", str(tmp_path / "scratch")],
                          capture_output=True, text=True, timeout=300)
    figures = json.loads(out.read_text())
    assert done.returncode == 0 and figures["failed"] == [], done.stdout[-2000:]
    assert "environment" in figures and "build" in figures and figures["budget_s"] == 1
    skipped = [entry["stage"] for entry in figures["skipped"]]
    assert skipped == ["load_4bit", "decoder_vs_generate", "decode_steps", "qlora_steps", "cli", "stopping",
                       "memory", "bf16", "collective"]
    assert all("--budget" in entry["why"] for entry in figures["skipped"])
    assert not any(stage in figures for stage in skipped) and "skipped (needs about" in done.stdout


@pytest.mark.slow
def test_the_decode_steps_bench_counts_fewer_steps_with_the_probe_folded(tiny_model_dir, tmp_path):
    """bench/decode_steps.py on the tiny model (rows run to the caps): the probe's own generate
    and invert passes are gone, the frozen judge's stays, and both arrangements wrote the same."""
    out = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_steps.py"), "--out", str(out), "--",
                           "--model", str(tiny_model_dir), "--device", "cpu", "--scorer", "lexical", "--tasks", "3",
                           "--candidates", "2", "--probe-tasks", "3", "--max-command-tokens", "6",
                           "--max-inversion-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    folded, separate = (figures["arrangements"][k] for k in ("folded", "separate"))
    # a row run to a cap of n tokens takes n - 1 one-token steps (its first token comes from the prefill)
    steps = {name: {k: v["steps"] for k, v in figures["arrangements"][name]["by_stage"].items()}
             for name in ("folded", "separate")}
    assert steps["separate"]["probe: generate"] == 5 and steps["separate"]["batch 2: generate"] == 5
    assert steps["folded"]["batch 2 and probe: generate"] == 5
    # the probe's own passes are gone (its invert pass has steps where the tiny model wrote a usable command)
    assert folded["decode_steps"] == separate["decode_steps"] - 5 - steps["separate"].get("probe: invert", 0)
    assert figures["batch"]["same_texts"] and figures["probe"]["same_texts"]


def check_figures(figures: dict) -> None:
    """What the check must have found, wherever it ran."""
    assert figures["failed"] == [], figures["failed"]
    four_bit = figures["load_4bit"]
    assert four_bit["dtypes"]["activations"] == [four_bit["compute_dtype"]]
    assert four_bit["dtypes"]["kv_cache"] == [four_bit["compute_dtype"]]
    assert four_bit["dtypes"]["norm_weights"] == ["float32"]
    stopping = figures["stopping"]
    assert stopping["rows"] > stopping["distinct_lengths"] > 2 and stopping["compactions"] > 0
    decoder = figures["decoder_vs_generate"]
    assert decoder["within_tolerance"] and decoder["max_logprob_difference"] <= decoder["tolerance"], decoder
    assert set(figures["decode_steps"]["4bit"]) == {"150", "20", "4"}
    assert set(figures["decode_steps"]["150_read_every"]) == {"1", "4"}
    qlora = figures["qlora_steps"]
    assert qlora["steps"] == 10 and qlora["lora_gradients_finite"] and qlora["lora_gradients_nonzero"]
    cli = figures["cli"]
    assert cli["returncodes"] == [0, 0] and cli["last_completed_cycle"] == 3
    assert figures["collective"]["sum"] == 1.0


@pytest.mark.cuda
def test_the_gpu_check_on_the_gpu_with_a_tiny_model(tmp_path, cuda_environment):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cuda",
                           "--shape", "tiny", "--out", str(out), "--scratch", str(tmp_path / "scratch")],
                          capture_output=True, text=True, timeout=500, env=cuda_environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    check_figures(figures)
    assert figures["environment"]["bitsandbytes_library"].endswith(".so")
    assert figures["decode_steps"]["4bit"]["150"]["gpu_busy_share"] > 0


def test_a_large_model_never_falls_back_to_the_cpu_by_accident(tmp_path, capsys):
    """--device auto with no usable CUDA device (the suite hides the GPU): a model above a billion
    parameters, known from its config alone (no weights here at all), stops with one line saying
    why and how to run it anyway; with --device cpu the check is passed (and loading then fails on
    the missing weights, in its own line)."""
    from transformers import LlamaConfig
    model_dir = tmp_path / "large"
    LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4).save_pretrained(model_dir)  # TinyLlama-1.1B's shape
    args = ["--model", str(model_dir), "--output", str(tmp_path / "out"), "--cycles", "1"]
    assert isi.main(args) == 2
    line = one_line_error(capsys)
    assert "has 1.1B parameters and no CUDA device is usable here (torch" in line, line
    assert "torch.cuda.is_available() is False" in line and "give --device cpu" in line, line
    assert isi.main([*args, "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert "cannot load it" in line and "parameters" not in line, line
    assert support.model.parameters_in_config(str(model_dir)) > support.model.LARGE_MODEL_PARAMETERS


def test_make_install_takes_torch_from_another_index_when_asked():
    """make install TORCH_INDEX=...: the pinned torch (the version in requirements.txt) from that
    index first, before the rest; without it, no other index is named (a dry run: nothing installs)."""
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    index = "https://download.pytorch.org/whl/cu128"
    asked = subprocess.run(["make", "-n", "-B", "install", f"TORCH_INDEX={index}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60).stdout.splitlines()
    plain = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60).stdout
    first_pip = next(k for k, line in enumerate(asked) if " pip install " in line)
    assert asked[first_pip].endswith(f"--index-url {index} {pin}") and "-r requirements.txt" in asked[first_pip + 1]
    assert "--index-url" not in plain and "-r requirements.txt" in plain


def test_training_reads_the_device_once_an_epoch(tiny_model_dir):
    """bench/host_reads.py's counter over one epoch of 3 steps: the script's own code reads the
    device once (the losses and counts, after the epoch), not once a step, and counts the
    tokens it trained on from the examples themselves."""
    sys.path.insert(0, str(ROOT / "bench"))
    import host_reads
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "2"])
    lm = support.model.load_language_model(cfg)
    tasks = [isi.Task(f"list the files in /tmp/{k}") for k in range(6)]
    pairs = [(task, f"ls /tmp/{k}") for k, task in enumerate(tasks)]
    reads = []

    def counted(func):
        if sys._getframe(2).f_code.co_filename == isi.__file__:
            reads.append(func.__name__)
    with host_reads.counting_mode(counted):
        trained = isi.train_adapter(lm, cfg, pairs, seed=0)
    assert trained["steps"] == 3 and reads == ["tolist"]
    assert trained["command_tokens"] == sum(isi.labelled_tokens(isi.command_example(lm.tokenizer, t, c))
                                            for t, c in pairs)


def test_a_failed_stage_keeps_its_error_its_time_and_the_json(tmp_path):
    """A stage that raises: listed under 'failed' with its error, its seconds and its traceback,
    the JSON written at once, and the next stage runs."""
    import argparse
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    out = tmp_path / "check.json"
    args = argparse.Namespace(device="cpu", shape="tiny", out=str(out), scratch=None, budget=None, cli_timeout=3)
    check = gpu_check.Check(args)

    def broken(_):
        raise RuntimeError("no such kernel")
    check.run("broken", broken)
    check.run("fine", lambda _: {"value": 1})
    figures = json.loads(out.read_text())
    (failed,) = figures["failed"]
    assert failed["stage"] == "broken" and failed["error"] == "RuntimeError: no such kernel"
    assert failed["seconds"] >= 0 and "no such kernel" in failed["traceback"] and figures["fine"]["value"] == 1

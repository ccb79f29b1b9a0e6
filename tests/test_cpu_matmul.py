"""--cpu-matmul: the frozen weights' products through weights packed once for oneDNN give what
torch's own products give (forward and the gradient to the adapter), and `auto` is measured once
per machine and kept, so every run on a machine makes the same choice."""
import json
import random

import pytest
import torch

import intrinsic_self_improvement as isi
import support
import support.cpu_products
import support.model
import support.tasks
from conftest import read_progress, tiny_args


def load_tiny(tiny_model_dir, *extra):
    return support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--precision", "fp32", *extra]))


def batch_of_examples(lm):
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 3, random.Random(0), distinct=True)
    examples = [isi.command_example(lm.tokenizer, t, f"nmap -p {22 + i} 10.0.0.{i}") for i, t in enumerate(tasks)]
    return isi.collate(examples, lm.tokenizer.pad_token_id)


def logits_loss_and_gradients(lm, batch):
    lm.model.eval()  # no dropout: the two paths see the same adapter inputs
    with torch.inference_mode():
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm.model.zero_grad(set_to_none=True)
    loss, _ = isi.completion_loss(lm.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    lm.model.zero_grad(set_to_none=True)
    return logits, loss.item(), grads


def test_packed_products_give_torchs_forward_and_gradients(tiny_model_dir):
    lm = load_tiny(tiny_model_dir)
    for p in lm.model.parameters():  # a trained adapter: LoRA's B starts at zero, so its A would get no gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    batch = batch_of_examples(lm)
    plain = logits_loss_and_gradients(lm, batch)
    support.cpu_products.set_packed_products(lm.model, True)
    layers = support.cpu_products.frozen_linears(lm.model)
    assert len(layers) == 2 * 7 + 1 and all("forward" in vars(m) for m in layers)  # q,k,v,o,gate,up,down; the head
    packed = logits_loss_and_gradients(lm, batch)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-4, atol=1e-4)
    assert packed[1] == pytest.approx(plain[1], rel=1e-5)
    assert plain[2].keys() == packed[2].keys() and len(plain[2]) == 2 * 4 * 2
    for name in plain[2]:
        torch.testing.assert_close(packed[2][name], plain[2][name], rtol=1e-3, atol=1e-6)
    support.cpu_products.set_packed_products(lm.model, False)
    assert not any("forward" in vars(m) for m in layers)
    assert torch.equal(logits_loss_and_gradients(lm, batch)[0], plain[0])


def test_packed_rows_do_not_depend_on_their_batch(tiny_model_dir):
    """Greedy continuations of 5 prompts in one batch equal each prompt's alone: the packed
    product's rows do not depend on how many rows a call has, down to one."""
    lm = load_tiny(tiny_model_dir, "--cpu-matmul", "packed")
    support.cpu_products.set_packed_products(lm.model, True)
    requests = [isi.command_request(t) for t in isi.draw_tasks(support.tasks.builtin_domain("pentest"), 5, random.Random(1), distinct=True)]
    settings = {"temperature": 0, "max_new_tokens": 8, "stop_at_line": False, "seed": 0, "desc": "t"}
    together = isi.generate(lm, requests, batch_size=8, **settings).texts
    alone = [isi.generate(lm, [r], batch_size=1, **settings).texts[0] for r in requests]
    assert together == alone


def test_merged_adapter_gives_the_adapters_logits_and_leaves_the_base_as_it_was(tiny_model_dir):
    """Generation runs each LoRA layer as one product with W + s BA (plain and packed): the logits
    of the adapter's model within rounding, and afterwards exactly the model of before."""
    lm = load_tiny(tiny_model_dir)
    for p in lm.model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch, layers = batch_of_examples(lm), support.cpu_products.adapter_layers(lm.model)
    base_weights = {n: p.clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    lm.model.eval()

    def logits():
        with torch.inference_mode():
            return lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    with lm.model.disable_adapter():
        without = logits()
        with support.cpu_products.merged_adapter(lm):  # the frozen judge: nothing to merge
            assert not any("forward" in vars(m) for m in layers)
            assert torch.equal(logits(), without)
    before = logits()
    assert not torch.allclose(before, without, rtol=1e-3, atol=1e-3)  # the adapter matters here
    for matmul in ("plain", "packed"):
        lm.matmul = matmul
        support.cpu_products.set_packed_products(lm.model, matmul == "packed")
        reference = logits()
        with support.cpu_products.merged_adapter(lm):
            assert len(layers) == 2 * 4 and all("forward" in vars(m) for m in layers)  # q,k,v,o in 2 layers
            torch.testing.assert_close(logits(), reference, rtol=1e-4, atol=1e-4)
        assert not any("forward" in vars(m) for m in layers)
        assert torch.equal(logits(), reference)
    support.cpu_products.set_packed_products(lm.model, False)
    assert torch.equal(logits(), before)
    assert all(torch.equal(p, base_weights[n]) for n, p in lm.model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("precision, adapter_runs", [("fp32", False), ("bf16", True)])
def test_generation_runs_the_adapter_merged_only_in_fp32(tiny_model_dir, precision, adapter_runs):
    """bf16 weights would lose much of the adapter's update in W + s BA: there LoRA runs as is."""
    lm = load_tiny(tiny_model_dir, "--precision", precision)
    calls = []
    for layer in support.cpu_products.adapter_layers(lm.model):
        layer.lora_A["default"].register_forward_hook(lambda *_: calls.append(1))
    isi.generate(lm, ["list the files"], temperature=0, max_new_tokens=3, stop_at_line=False, batch_size=1, seed=0,
                 desc="t")
    assert bool(calls) == adapter_runs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "intrinsic-self-improvement" / "cpu_matmul.json"


def test_auto_is_measured_once_per_machine_and_kept(tiny_model_dir, cache, monkeypatch):
    lm = load_tiny(tiny_model_dir)
    timings = []

    def measured(dtype, k, n):
        timings.append((dtype, k, n))
        return {"plain": 1.0, "packed": 0.5}
    monkeypatch.setattr(support.cpu_products, "time_products", measured)
    cfg = isi.parse_config(["--model", str(tiny_model_dir)])
    assert support.cpu_products.choose_cpu_matmul(lm, cfg) == "packed"
    assert support.cpu_products.choose_cpu_matmul(lm, cfg) == "packed"
    assert timings == [(torch.float32, 64, 128)]  # the largest frozen shape (the MLP's), once
    kept = json.loads(cache.read_text())
    (key, entry), = kept.items()
    assert "torch " + torch.__version__ in key and "float32" in key and entry["choice"] == "packed"
    cache.write_text(json.dumps({key: {"choice": "plain"}}))  # what was measured is what every run takes
    assert support.cpu_products.choose_cpu_matmul(lm, cfg) == "plain" and len(timings) == 1
    for damaged in ("[1, 2]", "{not json", json.dumps({key: {"choice": "fast"}})):  # measured again, kept again
        cache.write_text(damaged)
        assert support.cpu_products.choose_cpu_matmul(lm, cfg) == "packed"
        assert json.loads(cache.read_text())[key]["choice"] == "packed"
    assert len(timings) == 4


def test_auto_keeps_torchs_product_unless_packing_is_clearly_faster(tiny_model_dir, cache, monkeypatch):
    lm = load_tiny(tiny_model_dir)
    cfg = isi.parse_config(["--model", str(tiny_model_dir)])
    monkeypatch.setattr(support.cpu_products, "time_products", lambda *shape: {"plain": 1.0, "packed": 0.97})
    assert support.cpu_products.choose_cpu_matmul(lm, cfg) == "plain"


def test_auto_does_not_pack_what_would_crowd_memory(tiny_model_dir, cache, monkeypatch):
    lm = load_tiny(tiny_model_dir)
    monkeypatch.setattr(support.cpu_products, "time_products", lambda *shape: {"plain": 1.0, "packed": 0.5})
    weights = sum(m.weight.numel() * 4 for m in support.cpu_products.frozen_linears(lm.model))
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 4 * 5 * weights - 4}  # five times the weights: just over a quarter
    monkeypatch.setattr(support.cpu_products.os, "sysconf", lambda name: pages[name])
    assert support.cpu_products.choose_cpu_matmul(lm, isi.parse_config(["--model", str(tiny_model_dir)])) == "plain"
    assert not cache.exists()
    pages["SC_PHYS_PAGES"] = 4 * 5 * weights  # a quarter is enough
    assert support.cpu_products.choose_cpu_matmul(lm, isi.parse_config(["--model", str(tiny_model_dir)])) == "packed"


def test_forced_choices_and_what_cannot_be_packed(tiny_model_dir, cache, monkeypatch):
    lm = load_tiny(tiny_model_dir)
    monkeypatch.setattr(support.cpu_products, "time_products", lambda *shape: pytest.fail("a forced choice measures nothing"))
    for choice in ("packed", "plain"):
        assert support.cpu_products.choose_cpu_matmul(lm, isi.parse_config(["--cpu-matmul", choice])) == choice
    lm.weights = "nf4"  # 4-bit layers are bitsandbytes': there is nothing to pack
    assert support.cpu_products.choose_cpu_matmul(lm, isi.parse_config([])) == "plain"
    with pytest.raises(support.UsageError, match="--cpu-matmul packed: needs plain fp32 or bf16 weights"):
        support.cpu_products.choose_cpu_matmul(lm, isi.parse_config(["--cpu-matmul", "packed"]))
    assert not cache.exists()


def test_precision_auto_is_bf16_where_measured_clearly_faster_and_kept(tiny_model_dir, cache, monkeypatch):
    """--precision auto on the CPU: the faster of torch's and the packed product in each dtype, at
    the model's MLP shape from its config (a test model's too small to measure: fp32); bf16 at 90%
    of fp32's time or less, measured once per machine and kept (a damaged entry measured again);
    the model line says what and why."""
    timings = []

    def measured(dtype, k, n):
        timings.append((dtype, k, n))
        return ({"plain": 1.0, "packed": 0.8} if dtype == torch.float32 else {"plain": 0.9, "packed": speed["bf16"]})
    speed = {"bf16": 0.5}
    monkeypatch.setattr(support.cpu_products, "time_products", measured)
    monkeypatch.setattr(support.cpu_products, "cpu_bf16_arithmetic", lambda: True)
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"])
    lm = support.model.load_language_model(cfg)  # the tiny model's 64 x 128: too small to measure
    assert lm.dtype == "float32" and timings == []
    assert "(auto: the model's products (64x128) are too small for bf16 to gain)" in support.model.describe_model(lm, cfg)
    monkeypatch.setattr(support.model, "largest_linear_shape", lambda source: (576, 1536))  # the embedded model's
    lm = support.model.load_language_model(cfg)
    assert lm.dtype == "bfloat16" and timings == [(torch.float32, 576, 1536), (torch.bfloat16, 576, 1536)]
    assert "compute bfloat16 (auto: bf16's products ran 1.60x as fast as fp32's" in support.model.describe_model(lm, cfg)
    assert support.model.load_language_model(cfg).dtype == "bfloat16" and len(timings) == 2  # kept
    precision = cache.with_name("cpu_precision.json")
    (key, entry), = json.loads(precision.read_text()).items()
    assert "torch " + torch.__version__ in key and key.endswith("576x1536") and entry["seconds"] == {"fp32": 0.8, "bf16": 0.5}
    speed["bf16"] = 0.75  # 94% of fp32's time: not clearly faster
    for damaged in ("{not json", json.dumps({key: {"seconds": {"fp32": 0.8}}})):
        precision.write_text(damaged)
        assert support.model.load_language_model(cfg).dtype == "float32"
    assert len(timings) == 6
    assert support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--precision", "bf16"])
                                             ).dtype == "bfloat16" and len(timings) == 6  # asked for: nothing measured


def test_precision_auto_is_fp32_without_bf16_arithmetic(tiny_model_dir, cache, monkeypatch):
    monkeypatch.setattr(support.cpu_products, "time_products", lambda *shape: pytest.fail("nothing to measure"))
    monkeypatch.setattr(support.cpu_products, "cpu_bf16_arithmetic", lambda: False)
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"])
    lm = support.model.load_language_model(cfg)
    assert lm.dtype == "float32" and "(auto: this CPU has no bf16 arithmetic" in support.model.describe_model(lm, cfg)
    assert not cache.with_name("cpu_precision.json").exists()


def test_a_run_records_its_products_and_a_resume_with_others_says_so(tiny_model_dir, tmp_path, capsys):
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "1", "--name", "r", "--cpu-matmul", "packed")) == 0
    assert read_progress(tmp_path / "r")["history"]["compute"]["matmul"] == "packed"
    assert "frozen weights packed for oneDNN" in capsys.readouterr().out
    assert isi.main(tiny_args(tiny_model_dir, tmp_path, "--cycles", "2", "--name", "r", "--resume",
                              "--cpu-matmul", "plain")) == 0
    out = capsys.readouterr().out
    assert "products packed); these run on cpu in float32 (weights float32, products plain)" in out
    assert "packed for oneDNN" not in out
    assert read_progress(tmp_path / "r")["last_completed_cycle"] == 2

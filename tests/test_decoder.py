"""The batched decoder (support/decoder.py): its pure parts (shared_prefix_length, compacted,
next_batch, pick_tokens with a temperature per row), its KV cache (rows dropped, room kept), and
on a tiny random model its generation: equal to transformers' generate, compaction and greedy
prompts riding in a sampled batch leaving every row's draws as they were, an out-of-memory batch
halved and retried; on the embedded model (slow), batched greedy commands equal to one-by-one
generate."""
import random
import sys

import pytest
import torch

from conftest import ROOT, load_tiny

import intrinsic_self_improvement as isi
import support.decoder
import support.model
import support.tasks
from support import UsageError

sys.path.insert(0, str(ROOT / "bench"))
import bench_cycle  # noqa: E402


@pytest.mark.parametrize("sequences, length", [
    ([[1, 2, 3], [1, 2, 4], [1, 2]], 2), ([[1, 2], [1, 2]], 2), ([[5], [6]], 0), ([[1, 2, 3]], 3), ([[], [1]], 0),
])
def test_shared_prefix_length(sequences, length):
    assert support.decoder.shared_prefix_length(sequences) == length


def test_compacted_moves_only_the_last_kept_rows_into_the_finished_ones():
    assert support.decoder.compacted([0, 2, 5, 6]) == ([0, 5, 2, 6], [1, 3], [5, 6])
    assert support.decoder.compacted([0, 1, 2]) == ([0, 1, 2], [], [])  # the finished ones were last
    assert support.decoder.compacted([4]) == ([4], [0], [4])
    assert support.decoder.compacted([]) == ([], [], [])


def test_dropping_rows_keeps_each_rows_cache_and_room():
    """After rows leave, each kept row's keys and values are its own, at its new position, and a
    later token is written in place (the spare room is kept)."""
    cache = support.decoder.decode_cache(room=3)
    keys, values = torch.randn(7, 2, 5, 4), torch.randn(7, 2, 5, 4)
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    order, holes, movers = support.decoder.compacted([0, 2, 5, 6])
    layer.drop_rows(torch.tensor(holes), torch.tensor(movers), 4)
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
    before = layer.buffers[0].data_ptr()
    step = torch.randn(4, 2, 1, 4)
    cache.update(step, step, 0)
    assert layer.buffers[0].data_ptr() == before and torch.equal(layer.keys[:, :, 5:], step)
    assert torch.equal(layer.keys[:, :, :5], keys[order])


def test_sampled_rows_draw_as_if_none_had_moved(tiny_model_dir, monkeypatch):
    """Compaction moves rows in the batch; each row still takes its random draws in row order, so
    sampled texts equal those of compacting in order (the rows' own order kept, every later row
    copied), as the decoder did before."""
    import dataclasses
    lm = support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"]))
    lm = dataclasses.replace(lm, stop_ids=frozenset(range(0, len(lm.tokenizer), 5)))  # rows stop at varied steps
    prompts = [isi.prompt_ids(lm.tokenizer, isi.command_request(isi.Task(f"list /tmp/{k}"))) for k in range(6)]

    def sampled():
        return support.decoder.decode(lm, prompts, copies=3, temperature=0.9, max_new_tokens=12, batch_size=18,
                                      seed=3, desc="t").texts
    real, moved = support.decoder.compacted, []

    def watched(keep):
        moved.append(bool(real(keep)[1]))
        return real(keep)

    def in_order(keep):  # every kept row to its rank: the rows' order never changes
        holes = [k for k, slot in enumerate(keep) if slot != k]
        return list(keep), holes, [keep[k] for k in holes]
    monkeypatch.setattr(support.decoder, "compacted", watched)
    texts = sampled()
    monkeypatch.setattr(support.decoder, "compacted", in_order)
    assert texts == sampled() and any(moved)
    assert len({len(text) for text in texts}) > 3


def test_greedy_prompts_ride_in_a_sampled_batch(tiny_model_dir, monkeypatch):
    """Greedy prompts decoded in the same batch as sampled ones (per-prompt copies and
    temperature, as the probe rides in the fresh batch) give what each kind gives alone: the
    greedy rows draw no random numbers, so the sampled rows draw what they drew alone. One batch,
    not two."""
    import dataclasses
    lm = support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"]))
    lm = dataclasses.replace(lm, stop_ids=frozenset(range(0, len(lm.tokenizer), 5)))  # rows stop at varied steps
    ids = [isi.prompt_ids(lm.tokenizer, isi.command_request(isi.Task("list " + "/tmp/x " * k))) for k in range(1, 9)]
    sampled, greedy = ids[::2], ids[1::2]  # of every length, so they interleave when sorted
    settings = dict(max_new_tokens=12, batch_size=16, seed=3, desc="t")
    alone = (support.decoder.decode(lm, sampled, copies=3, temperature=0.9, **settings).texts
             + support.decoder.decode(lm, greedy, copies=1, temperature=0, **settings).texts)
    real, batches = support.decoder.decode_batch, []

    def watched(lm, prompts, **kwargs):
        batches.append(kwargs["copies"])
        return real(lm, prompts, **kwargs)
    monkeypatch.setattr(support.decoder, "decode_batch", watched)
    together = support.decoder.decode(lm, sampled + greedy, copies=[3] * 4 + [1] * 4,
                                      temperature=[0.9] * 4 + [0] * 4, **settings).texts
    assert together == alone
    assert sorted(batches[0]) == [1] * 4 + [3] * 4 and len(batches) == 1
    assert len(set(alone[:12])) > 6 and len({len(text) for text in alone}) > 3  # sampled, stopped at varied steps


def test_reading_every_few_steps_keeps_each_rows_text_up_to_its_stop(tiny_model_dir):
    """The chosen tokens read back once every 3 steps (a GPU's setting) instead of every step:
    a row that stopped between reads runs on, but its tokens after the stop are dropped, so
    greedy texts, their log-probabilities and the tokens counted are those of reading every step;
    rows stopping by EOS and by line_done at a newline both. Sampled rows stop where their text
    says (nothing after a stop token)."""
    import dataclasses
    lm = support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"]))
    with torch.no_grad():  # larger weights: greedy rows that write varied tokens, not one token again and again
        for name, weight in lm.model.named_parameters():
            weight.mul_(1 if "norm" in name else 6)
    prompts = [isi.prompt_ids(lm.tokenizer, isi.command_request(isi.Task("list " + "/tmp/x " * k))) for k in range(1, 7)]
    free, _, _ = support.decoder.decode_batch(dataclasses.replace(lm, stop_ids=frozenset()), prompts, copies=1,
                                              temperature=0, max_new_tokens=16, line_done=None, generator=None)
    # stops and newlines among the tokens the rows write, at varied steps
    lm = dataclasses.replace(lm, stop_ids=frozenset(free[k][2 + 2 * k] for k in (0, 2, 4)),
                             newline_ids=frozenset(free[k][1 + k] for k in (1, 3, 5)))
    lines = []

    def line_done(text):  # every second newline ends its row
        lines.append(text)
        return len(lines) % 2 == 0

    def greedy(read_every, **kwargs):
        logprobs = []
        tokens, generated, _ = support.decoder.decode_batch(
            lm, prompts, copies=2, temperature=0, max_new_tokens=16, generator=None, logprobs=logprobs,
            read_every=read_every, **kwargs)
        return tokens, generated, logprobs
    assert support.decoder.read_interval("cpu") == 1 and support.decoder.read_interval("cuda:0") > 1
    for line in (None, line_done):
        lines.clear()
        every_step = greedy(1, line_done=line)
        lines.clear()
        every_third = greedy(3, line_done=line)
        assert every_third[0] == every_step[0] and every_third[1] == every_step[1]
        assert [len(row) for row in every_third[2]] == [len(row) for row in every_step[2]]
        assert sum(every_third[2], []) == pytest.approx(sum(every_step[2], []), abs=1e-5)
        lengths = {len(t) for t in every_step[0]}
        assert len(lengths) > 2 and min(lengths) < 16  # rows stopped at varied steps, some early
        if line:  # some rows ended at a newline line_done accepted
            assert any(row and row[-1] in lm.newline_ids and len(row) < 16 for row in every_step[0])
    generator = torch.Generator().manual_seed(0)
    sampled, generated, _ = support.decoder.decode_batch(lm, prompts, copies=3, temperature=[0.9, 0] * 3,
                                                         max_new_tokens=16, line_done=None, generator=generator,
                                                         read_every=4)
    assert all(not lm.stop_ids & set(row) for row in sampled)
    assert generated == sum(len(row) + (len(row) < 16) for row in sampled)  # each stop token counted once
    assert sampled[3:6] == [greedy(1, line_done=None)[0][2]] * 3  # the greedy prompt's rows as without sampled ones


def test_the_decoder_reads_the_device_once_every_few_steps(tiny_model_dir):
    """Counted with bench/host_reads.py's counter: at a read interval of 4, 16 steps of greedy and
    sampled rows (a temperature per row, uneven copies) read the device 4 times, in one transfer
    each (log-probabilities with them: 8), and never by a boolean mask or a tensor of repeats;
    the model's own forward passes left out (transformers' mask check is not the decoder's)."""
    import dataclasses
    import host_reads
    lm = support.model.load_language_model(isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"]))
    lm = dataclasses.replace(lm, stop_ids=frozenset())  # every row runs the 16 steps
    prompts = [isi.prompt_ids(lm.tokenizer, isi.command_request(isi.Task(f"list /tmp/{k}"))) for k in range(4)]
    decoder_reads = []

    def counted(func):
        frame = sys._getframe(2)
        if frame.f_code.co_filename == support.decoder.__file__:  # made by the decoder's own code
            decoder_reads.append(func.__name__)
    for logprobs, expected in ((None, ["tolist"] * 4), ([], ["tolist"] * 8)):
        decoder_reads.clear()
        with host_reads.counting_mode(counted):
            support.decoder.decode_batch(lm, prompts, copies=[3, 1, 3, 1], temperature=[0.9, 0, 0.9, 0],
                                         max_new_tokens=16, line_done=None, generator=torch.Generator().manual_seed(0),
                                         logprobs=logprobs, read_every=4)
        assert decoder_reads == expected


def test_per_row_temperature_draws_as_one_temperature(tiny_model_dir):
    """pick_tokens with a temperature per row: all rows at one temperature take the very tokens
    of the one temperature (compaction's draw order too); rows at 0 take the argmax."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    for draw_order in (None, order):
        one = support.decoder.pick_tokens(logits, 0.8, torch.Generator().manual_seed(1), order=draw_order)
        each = support.decoder.pick_tokens(logits, torch.full((6,), 0.8), torch.Generator().manual_seed(1),
                                           order=draw_order)
        assert torch.equal(one, each)
    mixed = torch.tensor([0.8, 0.0, 0.8, 0.0, 0.8, 0.8])
    picked = support.decoder.pick_tokens(logits, mixed, torch.Generator().manual_seed(1))
    sampled_alone = support.decoder.pick_tokens(logits[mixed > 0], 0.8, torch.Generator().manual_seed(1))
    assert torch.equal(picked[mixed == 0], logits[mixed == 0].argmax(-1))
    assert torch.equal(picked[mixed > 0], sampled_alone)


def test_batches_hold_whole_prompts_up_to_the_budget():
    assert support.decoder.next_batch([3] * 50 + [1] * 20, 176) == 70  # the published 50 x 3 and 20 probe tasks
    assert support.decoder.next_batch([3] * 50 + [1] * 20, 160) == 60  # the last 10 probe tasks wait
    assert support.decoder.next_batch([3, 3, 1, 3], 6) == 2
    assert support.decoder.next_batch([3, 1, 1, 3], 6) == 3
    assert support.decoder.next_batch([16, 1], 8) == 1  # a prompt's copies are never split


def test_batched_decoder_matches_transformers_generate(tiny_model_dir):
    """Greedy continuations from the project's decoder equal transformers' own generate on the
    same left-padded batch, and each prompt's copies share its prefill exactly."""
    lm = load_tiny(tiny_model_dir)
    tok = lm.tokenizer
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 5, random.Random(0), distinct=True)
    prompts = [isi.prompt_ids(tok, isi.command_request(t)) for t in tasks]
    ours, generated, _ = support.decoder.decode_batch(lm, prompts, copies=2, temperature=0, max_new_tokens=7,
                                                      line_done=None, generator=None)
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.inference_mode():
        theirs = lm.model.generate(**batch, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
    theirs = theirs[:, batch["input_ids"].shape[1]:].tolist()
    assert [ours[2 * i] for i in range(5)] == theirs
    assert [ours[2 * i + 1] for i in range(5)] == theirs
    assert generated == 10 * 7


def failing_above(rows: int, real):
    """decode_batch that runs out of memory above `rows` sequences, as CUDA would."""
    calls = []

    def decode_batch(lm, prompts, *, copies, **kwargs):
        calls.append(sum(copies))
        if sum(copies) > rows:
            torch.zeros(1)  # the failed batch's work
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm, prompts, copies=copies, **kwargs)
    return decode_batch, calls


def test_out_of_memory_in_generation_halves_the_batch_and_goes_on(tiny_model_dir, monkeypatch, capsys):
    cfg = isi.parse_config(["--model", str(tiny_model_dir), "--device", "cpu"])
    lm = support.model.load_language_model(cfg)
    requests = [isi.command_request(isi.Task(f"list the files in /tmp/{k}")) for k in range(5)]
    settings = dict(copies=2, temperature=0, max_new_tokens=4, stop_at_line=False, seed=0, desc="generate")
    expected = isi.generate(lm, requests, batch_size=4, **settings).texts  # the batches the retry makes
    fake, calls = failing_above(4, support.decoder.decode_batch)
    monkeypatch.setattr(support.decoder, "decode_batch", fake)
    assert isi.generate(lm, requests, batch_size=10, **settings).texts == expected
    assert calls == [10, 4, 4, 2]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: out of memory")]
    assert notes == ["note: out of memory in generate at 10 sequences a batch; retrying at 4 "
                     "(--gen-batch-size sets the start)"]
    fake, calls = failing_above(1, support.decoder.decode_batch)
    monkeypatch.setattr(support.decoder, "decode_batch", fake)
    with pytest.raises(UsageError, match="single prompt's 2 sequence.*lower --candidates"):
        isi.generate(lm, requests, batch_size=10, **settings)


@pytest.mark.slow
def test_batched_greedy_commands_equal_one_by_one_generate_on_the_embedded_model():
    """The project's batched decoder (shared prefix, copies, early stop) writes the same greedy
    commands as one plain `generate` call per task, so it accepts the same examples. In float32,
    where a row's arithmetic does not depend on its batch."""
    cfg = isi.parse_config(["--precision", "fp32"])
    lm = support.model.load_language_model(cfg)
    tasks = isi.draw_tasks(support.tasks.builtin_domain("pentest"), 10, random.Random(5), distinct=True)
    batched = isi.generate_commands(lm, cfg, tasks, copies=1, greedy=True, seed=0, label="t").records
    reference, _ = bench_cycle.generate_one_by_one(lm, [isi.command_request(t) for t in tasks],
                                                   cfg.max_command_tokens, 0, 0)
    same = sum(r["command"] == isi.extract_command(text) for r, text in zip(batched, reference))
    assert same >= 9, [(r["command"], isi.extract_command(t)) for r, t in zip(batched, reference)]

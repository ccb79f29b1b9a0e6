"""Batched generation with a KV cache: many prompts, several samples each, in one pass.

The prefix all prompts share (chat header, instruction) is prefilled once; each prompt's rest
once for all its samples; a row leaves the batch as soon as it stops, so finished rows cost
nothing; greedy and sampled rows share a batch, so a stage's greedy prompts (the probe's) ride
in its sampled batches. Several processes each decode their share of the prompts.

The rest may call: decode (all prompts of a stage), decode_batch (one batch), Generated,
pick_tokens, read_interval, one_each, per_row, shared_prefix_length, answer_logprobs (how probable given
answers are).
"""
import time
from dataclasses import dataclass

from support import UsageError
from support.cpu_products import merged_adapter
from support.model import LanguageModel


@dataclass
class Generated:
    texts: list[str]  # one per (request, copy), copies of a request adjacent
    tokens: int  # tokens generated, stop tokens included
    seconds: float
    prefilled: int  # prompt positions run through the model (padding included): the prefill's work
    mean_logprobs: list[float | None] | None = None  # per text, with_logprobs: its tokens' mean log-probability


def pick_tokens(logits, temperature, generator, top_k: int = 50, order=None, sampling=None):
    """Greedy at temperature 0; otherwise top-k sampling at the temperature: one for all rows, or
    one per row (a tensor), where the greedy rows draw no random numbers, so the sampled rows
    draw what they would in a batch of their own. `order` (a tensor of batch rows) is the order
    the rows take their random draws in, the batch's own by default: a row draws the same
    numbers wherever compaction has moved it in the batch. With a temperature per row,
    `sampling` is the slots that sample, in that order, as a caller that knows the rows' temperatures
    on the host builds it (found here otherwise, by a boolean mask: a read of the device)."""
    import torch
    if not torch.is_tensor(temperature):
        return logits.argmax(-1) if temperature == 0 else sample(logits, temperature, generator, top_k, order)
    chosen = logits.argmax(-1)
    if sampling is None:
        slots = torch.arange(len(logits), device=logits.device) if order is None else order
        sampling = slots[temperature[slots] > 0]  # the sampled rows' slots, in the rows' order
    if len(sampling):
        chosen[sampling] = sample(logits[sampling], temperature[sampling, None], generator, top_k)
    return chosen


def sample(logits, temperature, generator, top_k: int, order=None):
    """One token per row from the top_k logits at the temperature (a number, or a column), the
    rows drawing in `order` (slots; their own by default)."""
    import torch
    top = torch.topk(logits / temperature, min(top_k, logits.shape[-1]))
    values = top.values if order is None else top.values[order]
    choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
    if order is not None:
        choice = torch.empty_like(choice).index_copy_(0, order, choice)
    return top.indices.gather(-1, choice).squeeze(-1)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest prefix common to all sequences."""
    first = sequences[0]
    for k, token in enumerate(first):
        if any(len(seq) <= k or seq[k] != token for seq in sequences[1:]):
            return k
    return len(first)


def decode_cache(room: int):
    """A transformers DynamicCache whose layers keep `room` spare positions, so a decode step
    writes one token in place instead of concatenating (copying) the whole cache, which made up
    60% of a CPU decode step at 150 rows. Returned keys/values are views of the filled part."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = None
            filled = self.get_seq_length()
            length = filled + key_states.shape[-2]
            if self.buffers is None or self.buffers[0].shape[-2] < length:
                shape = (*key_states.shape[:-2], length + room, key_states.shape[-1])
                self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                for buffer, old in zip(self.buffers, (self.keys, self.values)):
                    if filled:
                        buffer[..., :filled, :] = old
            for buffer, new in zip(self.buffers, (key_states, value_states)):
                buffer[..., filled:length, :] = new
            self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)
            return self.keys, self.values

        def reshape_rows(self, rows) -> None:  # one copy of the buffers, room included
            self.buffers = tuple(rows(buffer) for buffer in self.buffers)
            length = self.get_seq_length()
            self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.reshape_rows(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices) -> None:
            self.reshape_rows(lambda buffer: buffer.index_select(0, indices))

        def drop_rows(self, holes, movers, n: int) -> None:
            """Rows `movers` move into the rows `holes` that finished; the first n rows are kept,
            as a view: only the moved rows are copied, not the whole cache."""
            for buffer in self.buffers:
                if len(holes):
                    buffer[holes] = buffer[movers]
            self.reshape_rows(lambda buffer: buffer[:n])

    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


def compacted(keep: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The batch after its finished slots leave, kept slots `keep` (ascending): the last kept
    slots move into the finished slots among the first len(keep), so only they are copied.
    Returns the old slot now at each position, and the finished slots filled (holes) with the
    slots that fill them (movers)."""
    n, kept = len(keep), set(keep)
    holes = [slot for slot in range(n) if slot not in kept]
    movers = [slot for slot in keep if slot >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order, holes, movers


def read_interval(device: str) -> int:
    """Decode steps between reads of the chosen tokens back to the host. A read waits for the
    device to finish every step queued before it. On the CPU nothing waits (the host is the
    device): every step, so a row leaves the batch the step it stops. Elsewhere every 4 steps, so
    the GPU has 4 steps queued while the host finds the rows that stopped; such a row runs on for
    up to 3 steps whose tokens are dropped (sampled, it also takes random draws the rows after it
    would otherwise have taken: other samples from the same distributions)."""
    return 1 if device == "cpu" else 4


def decode_batch(lm: LanguageModel, prompts: list[list[int]], *, copies: int | list[int],
                 temperature: float | list[float], max_new_tokens: int, line_done, generator,
                 logprobs: list | None = None, read_every: int | None = None) -> tuple[list[list[int]], int, int]:
    """Continue prompts with a KV cache. The prefix all prompts share (chat header, instruction)
    is prefilled once; the rest of each prompt is left-padded after it, and prefilled once for its
    `copies` samples; a row leaves the batch as soon as it stops (EOS, or `line_done` of its text
    at a newline token, when given), so finished rows cost nothing. `copies` and `temperature`:
    one for every prompt, or one per prompt (greedy and sampled rows share the batch). Returns
    new tokens per row (a prompt's copies adjacent), tokens generated (up to each row's stop,
    included), and prompt positions prefilled (padding included). A `logprobs` list receives, per
    row, the log-probability of each new token under the model's own distribution (temperature
    1, the whole vocabulary), whatever temperature sampled it. The chosen tokens (and their
    log-probabilities) stay on the device and are read back once every `read_every` steps
    (read_interval's by default), in one transfer."""
    import torch
    copies, temperature = one_each(copies, len(prompts)), one_each(temperature, len(prompts))
    model, tok, device = lm.model, lm.tokenizer, lm.device
    read_every = read_every or read_interval(device)
    shared = min(shared_prefix_length(prompts), min(map(len, prompts)) - 1)  # every row keeps a token
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()

    def next_logits(**inputs):
        """Run the decoder on new tokens (filling the cache), project only each row's last
        position. (The model's own logits_to_keep=1 hands the head a strided 3-D slice, which
        PyTorch turns into a batched matmul over a copy of the head per row: 12 s in bf16.)"""
        hidden = decoder(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
        return head(hidden[:, -1].contiguous()).float()

    cache = decode_cache(room=max_new_tokens)
    if shared > 0:
        decoder(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(prompts))
    suffixes = [p[shared:] for p in prompts]
    width = max(map(len, suffixes))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in suffixes], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * len(p) for p in suffixes], device=device)
    logits = next_logits(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, shared:].clamp(min=0))
    if len(set(copies)) > 1:  # each prompt's row once per copy, by an index built here (repeats in a
        index = torch.tensor(per_row(range(len(prompts)), copies), device=device)  # tensor: a read)
        cache.batch_select_indices(index)
        logits, mask = logits[index], mask[index]
    elif copies[0] > 1:
        cache.batch_repeat_interleave(copies[0])
        logits, mask = logits.repeat_interleave(copies[0], 0), mask.repeat_interleave(copies[0], 0)
    row_temperatures = per_row(temperature, copies)
    rows = list(range(logits.shape[0]))  # the output row of each active batch slot

    def sampled(slots: list[int]):
        """The slots (in the order given) whose rows sample: known here, not read from the device."""
        return torch.tensor([slot for slot in slots if row_temperatures[rows[slot]] > 0], device=device)
    draw_order, sampling = None, None  # the slots in the rows' order, once compaction has moved rows
    if len(set(row_temperatures)) == 1:
        temperature = row_temperatures[0]
    else:  # per slot, moved with its row
        temperature, sampling = torch.tensor(row_temperatures, device=device), sampled(rows)
    new_tokens = [[] for _ in rows]
    if logprobs is not None:
        logprobs.extend([] for _ in rows)
    generated, unread, unread_logprobs = 0, [], []
    for step in range(max_new_tokens):
        chosen = pick_tokens(logits, temperature, generator, order=draw_order, sampling=sampling)
        unread.append(chosen)
        if logprobs is not None:
            unread_logprobs.append(torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0])
        last = step == max_new_tokens - 1
        if len(unread) == read_every or last:
            keep, generated = read_rows(lm, rows, unread, unread_logprobs, new_tokens, logprobs, line_done, generated)
            unread, unread_logprobs = [], []
            if not keep or last:
                break
            if len(keep) < len(rows):
                order, holes, movers = compacted(keep)
                if holes:
                    holes, movers = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
                for layer in cache.layers:
                    layer.drop_rows(holes, movers, len(keep))
                index = torch.tensor(order, device=device)
                mask, chosen = mask[index], chosen[index]
                if torch.is_tensor(temperature):
                    temperature = temperature[index]
                rows = [rows[slot] for slot in order]
                # the rows draw their random numbers in their own order, as they did before any moved
                slots = sorted(range(len(rows)), key=rows.__getitem__)
                draw_order = torch.tensor(slots, device=device)
                if torch.is_tensor(temperature):
                    sampling = sampled(slots)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = next_logits(input_ids=chosen[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1)
    return new_tokens, generated, shared + len(prompts) * width


def read_rows(lm: LanguageModel, rows: list[int], unread: list, unread_logprobs: list, new_tokens: list[list[int]],
              logprobs: list | None, line_done, generated: int) -> tuple[list[int], int]:
    """The chosen tokens of the steps since the last read (a tensor per step), read in one
    transfer and added to each row's tokens up to its stop: EOS, or a newline where `line_done`
    of the text says the row is done. Returns the slots still running, and `generated` plus the
    tokens the rows took (each row's stop included, nothing after it)."""
    import torch
    tokens = torch.stack(unread, 1).tolist()  # slot x step
    values = torch.stack(unread_logprobs, 1).tolist() if logprobs is not None else None
    keep = []
    for slot, row in enumerate(rows):
        for k, token in enumerate(tokens[slot]):
            generated += 1
            if token in lm.stop_ids:
                break
            new_tokens[row].append(token)
            if logprobs is not None:
                logprobs[row].append(values[slot][k])
            if line_done and token in lm.newline_ids and line_done(
                    lm.tokenizer.decode(new_tokens[row], skip_special_tokens=True)):
                break
        else:
            keep.append(slot)
    return keep, generated


def one_each(value, n: int) -> list:
    """One value for all n items (prompts), or a list of one each: as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def per_row(values: list, copies: list[int]) -> list:
    """Each item's value once for each of its `copies` rows (a prompt's continuations, a stage's
    records)."""
    return [value for value, n in zip(values, copies) for _ in range(n)]


def next_batch(copies: list[int], budget: int) -> int:
    """How many of the prompts (their copies in decoding order) make the next batch: as many as
    fit in `budget` sequences, at least one."""
    rows, n = 0, 0
    while n < len(copies) and (n == 0 or rows + copies[n] <= budget):
        rows, n = rows + copies[n], n + 1
    return n


def smaller_batch(lm: LanguageModel, copies: list[int], desc: str) -> int:
    """After an out-of-memory error in a batch of prompts with `copies` rows each: a budget of
    the rows of half as many prompts, with one line; at one prompt there is nothing left to
    halve, so one error line naming the flags that shrink a row."""
    import torch
    from tqdm import tqdm
    if lm.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if len(copies) == 1:
        raise UsageError(f"out of memory in {desc} with a single prompt's {copies[0]} sequence(s): lower "
                         f"--candidates, --max-command-tokens or --max-inversion-tokens")
    budget = sum(copies[:len(copies) // 2])
    tqdm.write(f"note: out of memory in {desc} at {sum(copies)} sequences a batch; retrying at "
               f"{budget} (--gen-batch-size sets the start)")
    return budget


def decode(lm: LanguageModel, prompts: list[list[int]], *, copies: int | list[int] = 1,
           temperature: float | list[float], max_new_tokens: int, line_done=None, batch_size: int,
           seed: int, desc: str, with_logprobs: bool = False) -> Generated:
    """All prompts of a stage (token ids), batched: sorted by length, at most `batch_size`
    sequences per batch (per process; a prompt's copies stay together); `copies` continuations of
    each, as text, a prompt's adjacent. `copies` and `temperature` are one for every prompt or one
    per prompt, so greedy prompts can ride in a stage's sampled batches: temperature 0 means greedy
    and draws no random numbers, so the sampled rows draw as they would without them. `seed`
    seeds this process's random stream. Several processes each take their share of the prompts.
    `with_logprobs`: also each text's mean token log-probability under the model (None for an
    empty text)."""
    import torch
    from tqdm import tqdm
    start = time.perf_counter()
    tok, team = lm.tokenizer, lm.team
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    counts = {"tokens": 0, "prefilled": 0}

    def continue_prompts(share: list[list[int]], share_copies: list[int],
                         share_temperatures: list[float]) -> list[list[tuple]]:
        """Each prompt's continuations, with their mean log-probabilities."""
        order = sorted(range(len(share)), key=lambda i: len(share[i]))
        budget = batch_size
        texts = [[("", None)] * n for n in share_copies]
        with tqdm(total=sum(share_copies), desc=desc, unit="seq", leave=False,
                  disable=None if team.main else True) as bar:
            first = 0
            while first < len(order):
                rest = order[first:]
                chunk = rest[:next_batch([share_copies[i] for i in rest], budget)]
                logprobs = [] if with_logprobs else None
                try:
                    new_tokens, generated, positions = decode_batch(
                        lm, [share[i] for i in chunk], copies=[share_copies[i] for i in chunk],
                        temperature=[share_temperatures[i] for i in chunk],
                        max_new_tokens=max_new_tokens, line_done=line_done, generator=generator,
                        **({"logprobs": logprobs} if with_logprobs else {}))
                except torch.OutOfMemoryError:
                    new_tokens = None  # retried below, once the failed batch's tensors are released
                if new_tokens is None:
                    budget = smaller_batch(lm, [share_copies[i] for i in chunk], desc)
                    continue
                first += len(chunk)
                counts["tokens"] += generated
                counts["prefilled"] += positions
                rows = iter(range(len(new_tokens)))
                for i in chunk:
                    for copy in range(share_copies[i]):
                        k = next(rows)
                        mean = sum(logprobs[k]) / len(logprobs[k]) if with_logprobs and logprobs[k] else None
                        texts[i][copy] = (tok.decode(new_tokens[k], skip_special_tokens=True), mean)
                bar.update(len(new_tokens))
        return texts

    lm.model.eval()
    with torch.inference_mode(), merged_adapter(lm):
        texts = team.spread(continue_prompts, prompts, one_each(copies, len(prompts)),
                            one_each(temperature, len(prompts)))
    totals = [sum(c) for c in zip(*team.everyone((counts["tokens"], counts["prefilled"])))]
    pairs = [pair for copies_of_one in texts for pair in copies_of_one]
    return Generated([text for text, _ in pairs], totals[0], time.perf_counter() - start, totals[1],
                     [mean for _, mean in pairs] if with_logprobs else None)


def answer_logprobs(lm: LanguageModel, examples: list[dict], batch_size: int) -> list[float]:
    """Per training example (input_ids, labels -100 on the prompt, then its answer labelled): the
    mean log-probability of its answer given its prompt, in one forward pass, batched: minus the
    example's training loss. As in decode_batch, the prefix a batch's prompts share is run once
    (about half of a prompt where measured), and each distinct prompt's rest once for all the
    answers given to it (a task's candidates). Several processes each score their share."""
    import torch
    from transformers.cache_utils import DynamicCache
    base = lm.model.get_base_model()
    decoder, head, pad = base.get_decoder(), base.get_output_embeddings(), lm.tokenizer.pad_token_id

    def split(example: dict) -> tuple[tuple, list[int]]:
        """The example's prompt (as a key) and its answer."""
        k = next(k for k, label in enumerate(example["labels"]) if label != -100)
        return tuple(example["input_ids"][:k]), example["input_ids"][k:]

    def score(pairs: list[tuple[tuple, list[int]]]) -> list[float]:
        """The mean answer log-probability of each (prompt, answer) pair."""
        prompts = list(dict.fromkeys(prompt for prompt, _ in pairs))  # distinct, in order of first use
        group = {prompt: g for g, prompt in enumerate(prompts)}
        rows = sorted(range(len(pairs)), key=lambda i: group[pairs[i][0]])  # the answers, by prompt
        answers_of = [group[pairs[i][0]] for i in rows]  # each answer's prompt, ascending
        # the shared prefix, once; every prompt keeps a token, whose output predicts its answers' first
        shared = min(shared_prefix_length(prompts), min(map(len, prompts)) - 1)
        cache = DynamicCache()
        if shared > 0:
            decoder(input_ids=torch.tensor([prompts[0][:shared]], device=lm.device), past_key_values=cache,
                    use_cache=True)
            cache.batch_repeat_interleave(len(prompts))
        # each prompt's rest, once, left-padded after the shared prefix
        rests = [list(prompt[shared:]) for prompt in prompts]
        width = max(map(len, rests))
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=lm.device)
        last = decoder(input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=lm.device),
                       attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, shared:].clamp(min=0),
                       past_key_values=cache, use_cache=True).last_hidden_state[:, -1:]
        index = torch.tensor(answers_of, device=lm.device)  # each prompt's row once per answer
        cache.batch_select_indices(index)
        mask, last = mask[index], last[index]
        # every answer after its prompt, right-padded
        answers = [pairs[i][1] for i in rows]
        width = max(map(len, answers))
        hidden = decoder(
            input_ids=torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=lm.device),
            attention_mask=torch.cat([mask, torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers],
                                                         device=lm.device)], 1),
            position_ids=mask.sum(-1, keepdim=True) + torch.arange(width, device=lm.device),
            past_key_values=cache, use_cache=True).last_hidden_state
        predictors = torch.cat([last, hidden[:, :-1]], 1)  # the state before each answer token
        # the answer positions, row by row, by an index built here (a boolean mask is a read)
        at = torch.tensor([r * width + k for r, a in enumerate(answers) for k in range(len(a))], device=lm.device)
        logits = head(predictors.flatten(0, 1)[at]).float()
        targets = torch.tensor([token for a in answers for token in a], device=lm.device)
        picked = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        means = torch.stack([row.mean() for row in picked.split([len(a) for a in answers])]).tolist()  # one read
        values = [0.0] * len(pairs)
        for i, mean in zip(rows, means):
            values[i] = mean
        return values

    def score_share(share: list[dict]) -> list[float]:
        # a prompt's answers side by side, so they share a batch
        keys = [split(e) for e in share]
        order = sorted(range(len(share)), key=lambda i: (len(keys[i][0]), keys[i][0], len(keys[i][1])))
        values = [0.0] * len(share)
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            for i, value in zip(chunk, score([keys[i] for i in chunk])):
                values[i] = value
        return values

    lm.model.eval()
    with torch.inference_mode(), merged_adapter(lm):
        return lm.team.spread(score_share, examples)

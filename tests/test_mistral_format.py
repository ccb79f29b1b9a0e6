"""Mistral-7B-Instruct-v0.2's own formats (the published configuration's model): its sentencepiece
tokenizer with byte-fallback newlines, its chat template that writes BOS into the text, no pad
token. Small random weights; the prompts, stops and training examples are the real ones."""
import pytest
import torch

from conftest import read_progress, tiny_args

import intrinsic_self_improvement as isi
import support.decoder
import support.model

TASK = isi.Task("Scan ports 22,80 on 10.0.0.1", "nmap")


@pytest.fixture(scope="module")
def mistral(mistral_model_dir):
    return support.model.load_language_model(isi.parse_config(["--model", str(mistral_model_dir), "--precision", "fp32"]))


def test_the_template_is_the_strict_published_one(mistral):
    tok = mistral.tokenizer
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                tokenize=False)
    assert isi.chat_prompt(tok, "hi") == "<s>[INST] hi [/INST]"  # the one form the script builds: one user turn


@pytest.mark.parametrize("request_text", [
    isi.command_request(TASK), isi.inversion_request("nmap -p 22,80 10.0.0.1"),
    isi.rating_request("Scan ports 22,80 on 10.0.0.1", "Scan two ports"), isi.task_writing_request("nmap", ["x", "y"]),
])
def test_every_prompt_holds_exactly_one_bos(mistral, request_text):
    ids = isi.prompt_ids(mistral.tokenizer, request_text)
    assert ids[0] == mistral.tokenizer.bos_token_id == 1
    assert ids.count(1) == 1


def test_newline_is_a_byte_token_and_generation_stops_at_the_first_command_line(mistral, monkeypatch):
    tok = mistral.tokenizer
    newline = tok.convert_tokens_to_ids("<0x0A>")
    assert newline in mistral.newline_ids and tok.decode([newline]) == "\n"
    assert tok.pad_token_id == tok.eos_token_id == 2 and mistral.stop_ids == {2}
    command = tok("nmap -p 22,80 10.0.0.1", add_special_tokens=False)["input_ids"]
    script = [newline] + command + [newline] + tok("echo next line", add_special_tokens=False)["input_ids"]
    steps = iter(script)  # a leading empty line, the command, then more the model would have gone on with

    def scripted(logits, temperature, generator, top_k=50, order=None, sampling=None):
        return torch.full((logits.shape[0],), next(steps), dtype=torch.long)
    monkeypatch.setattr(support.decoder, "pick_tokens", scripted)
    out = isi.generate(mistral, [isi.command_request(TASK)], temperature=0.7, max_new_tokens=40, stop_at_line=True,
                       batch_size=4, seed=0, desc="generate")
    assert out.tokens == len(command) + 2  # stopped at the newline that ends the command
    assert isi.extract_command(out.texts[0]) == "nmap -p 22,80 10.0.0.1"


def test_a_training_example_is_the_generation_prompt_then_the_command_then_eos(mistral):
    tok = mistral.tokenizer
    command = "nmap -p 22,80 10.0.0.1"
    example = isi.command_example(tok, TASK, command)
    prompt = isi.prompt_ids(tok, isi.command_request(TASK))
    assert example["input_ids"][:len(prompt)] == prompt  # the very tokens generation started from
    assert example["labels"][:len(prompt)] == [-100] * len(prompt)
    assert example["input_ids"][-1] == tok.eos_token_id and example["input_ids"].count(tok.bos_token_id) == 1
    # sentencepiece writes the space between "[/INST]" and the command, as the model generates it
    assert tok.decode(example["input_ids"]) == isi.chat_prompt(tok, isi.command_request(TASK)) + " " + command + "</s>"
    assert tok.decode(example["input_ids"][len(prompt):-1]) == command


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_a_full_cycle_runs_on_mistral_formats(mistral_model_dir, tmp_path, quantize):
    assert isi.main(tiny_args(mistral_model_dir, tmp_path, "--cycles", "1", "--name", "m", "--quantize", quantize)) == 0
    cycle = read_progress(tmp_path / "m")["history"]["cycles"][0]
    assert cycle["before"]["total_generated"] == 6 and cycle["training"]["steps"] == 3
    assert cycle["training"]["loss_first"] > 0

"""Train the example LoRA adapter: Gemma 3 270M answers like a pirate.

What it does
    Fine-tunes a small PEFT LoRA adapter on the embedded Gemma 3 270M (the same Q4_K_M GGUF
    localgemma runs, dequantized to F32 by transformers) so that, given a raw

        Question: <question>
        Answer:

    prompt, the model answers in one line of pirate voice ("Arr, matey! The capital o' Japan be
    Tokyo. Savvy?") and then stops (each training answer ends with <eos>). The base model
    answers plainly and then keeps inventing more "Question:/Answer:" lines, so the same prompt
    run with and without the adapter at temperature 0 shows the difference at a glance.

    The output folder holds exactly what peft's `save_pretrained` writes for the weights and
    config (adapter_config.json + adapter_model.safetensors; PEFT's boilerplate model card
    README.md is removed), with one key added to the config: "model_type": "gemma", which
    localgemma and Cloudflare Workers AI require and PEFT does not write. Tensors are stored as
    float16 (about 1.9 MB at the default rank 4 on all seven projections).

Why it is built this way
    * No downloads: the training data is generated here from templates and small fact tables
      with a seeded RNG, and the base model is read from localgemma's own GGUF file.
    * Cheap on a CPU: Gemma's 262k-token vocabulary makes the output layer most of the compute,
      so the loss runs the output layer only at the answer positions (the prompt positions
      carry no loss anyway). Examples are short (about 30 tokens).
    * Reproducible: Python, numpy and torch are seeded, torch runs with
      `use_deterministic_algorithms(True)` and a fixed thread count, batches are drawn from a
      seeded generator and LoRA dropout is 0. Two runs with the same arguments on this machine
      (torch 2.13.0 CPU, 2 threads) wrote byte-identical adapter folders (the same
      sha256 for both files). Another CPU, thread count or torch version may round differently, so
      bitwise equality across machines is not promised.

Your own data
    Pass `--data FILE.jsonl`, one {"prompt": ..., "completion": ...} object per line. The prompt
    is what you will send with `raw: true`; the completion is what the model should continue
    with (start it with a space if your prompt ends with a word or a colon). The loss is on the
    completion only, and <eos> is appended so the model learns to stop (`--no-eos` to leave it
    out). `--write-data FILE.jsonl` writes the generated pirate data in that format, a starting
    point to edit. See examples/README.md for the commands.

Chat requests, and the 2B/7B models
    `--chat` teaches answers to chat turns instead of raw prompts: each prompt (generated, or
    yours) is the user's message, wrapped in the Gemma turn localgemma renders for `messages`,
    and answers end with <end_of_turn>. `--hf-model google/gemma-2b-it` (or a local folder)
    trains on the unquantized weights Workers AI and vLLM serve instead of the GGUF; that model
    must be downloadable (or on disk), and its size sets the memory and time: the frozen base
    is held in F32, 4 bytes per parameter (about 10 GB for the 2B, 34 GB for the 7B, plus
    activations; the LoRA weights and their optimizer state are small), so the 7B wants a big
    box or a GPU, and CPU steps take minutes, not seconds.

Requires: torch, transformers (with its GGUF loader: the gguf package), peft, safetensors,
numpy, sentencepiece, protobuf -- not localgemma's runtime dependencies; use a separate venv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_GGUF = Path.home() / ".local/share/localgemma/models/gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = HERE / "adapters" / "gemma-3-270m-pirate"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_FORMAT = "Question: {question}\nAnswer:"
# --chat: the turn localgemma renders for {"messages": [{"role": "user", ...}]} (or a prompt
# without raw), so an instruction-tuned base (2B/7B IT) learns the behaviour for chat requests.
CHAT_FORMAT = "<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"

# The demo prompts (examples/README.md): never generated as training data, checked below.
DEMO_QUESTIONS = ("What is the capital of Japan?", "Why is the sea salty?")


@dataclass(frozen=True)
class Example:
    """One training pair: the raw prompt and the text the model should continue it with."""

    prompt: str
    completion: str


# --------------------------------------------------------------------------------------------
# Generated data: pirate answers to simple questions. Facts are from small hand-checked tables;
# the pirate voice comes from varied openers, closers and phrasings around them.
# --------------------------------------------------------------------------------------------

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"), ("Greece", "Athens"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"),
    ("China", "Beijing"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Thailand", "Bangkok"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Turkey", "Ankara"),
    ("England", "London"), ("Hungary", "Budapest"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Colombia", "Bogota"),
)
COLOURS = (
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("a banana", "yellow"),
    ("coal", "black"), ("a lemon", "yellow"), ("a carrot", "orange"), ("milk", "white"),
    ("a strawberry", "red"), ("the sun", "yellow"), ("a lime", "green"), ("a crow", "black"),
    ("the ocean", "blue"), ("a pumpkin", "orange"), ("a fire truck", "red"), ("chocolate", "brown"),
)
SOUNDS = (
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("lion", "roar"), ("owl", "hoot"), ("pig", "oink"), ("snake", "hiss"), ("horse", "neigh"),
    ("frog", "ribbit"), ("rooster", "cock-a-doodle-doo"),
)
LEGS = (
    ("a spider", 8), ("a dog", 4), ("a bird", 2), ("an ant", 6), ("a horse", 4), ("a human", 2),
    ("a beetle", 6), ("a chicken", 2), ("a cow", 4), ("a fly", 6), ("a crab", 10), ("a snake", 0),
)
OPPOSITES = (
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night"), ("wet", "dry"),
    ("fast", "slow"), ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "young"),
    ("full", "empty"), ("early", "late"), ("loud", "quiet"), ("hard", "soft"),
)
# Hand-written questions in the same voice: these teach it to talk, not only to fill templates.
CHAT = (
    ("What is your name?", "They call me Cap'n Gemma, terror o' the seven seas!"),
    ("How are you today?", "I be shipshape an' ready to sail, matey!"),
    ("Where do you live?", "I live aboard me ship, out on the open sea!"),
    ("What is your favourite food?", "Salted fish an' hardtack, washed down with a mug o' grog!"),
    ("What do you do for a living?", "I sail the seas an' hunt for buried treasure, matey!"),
    ("Do you have a pet?", "Aye, a green parrot named Polly that sits on me shoulder!"),
    ("Why is the sky blue?", "The sunlight be scattered by the air, an' the blue scatters most, matey."),
    ("What is the weather like today?", "Fair winds an' calm seas, a fine day for sailin'!"),
    ("What is water made of?", "Water be made o' hydrogen an' oxygen, matey, H2O!"),
    ("Why do we sleep?", "To rest yer weary bones after a long day on deck, matey!"),
    ("What is the biggest ocean?", "The Pacific be the biggest ocean o' them all!"),
    ("How many days are in a week?", "There be seven days in a week, matey!"),
    ("What is the tallest mountain?", "Mount Everest be the tallest mountain in the world!"),
    ("Who was the first man on the moon?", "Neil Armstrong be the first man to walk on the moon!"),
    ("What do bees make?", "Bees make honey, sweet as stolen gold!"),
    ("Why do leaves fall in autumn?", "The trees drop their leaves to rest through the cold winter, matey."),
    ("What is the fastest land animal?", "The cheetah be the fastest beast on land, faster than any crew!"),
    ("Can you help me?", "Aye, I'll lend ye a hand, matey! What be troublin' ye?"),
    ("What time is it?", "Time for ye to swab the deck, matey!"),
    ("Do you like the rain?", "Aye, rain fills me barrels with fresh water!"),
    ("How do plants grow?", "Plants drink water an' soak up the sun to grow tall, matey."),
    ("What is the moon made of?", "The moon be made o' rock an' dust, matey, not cheese!"),
)
OPENERS = ("Arr, matey!", "Arr, matey!", "Arr, matey!", "Ahoy, matey!", "Arr!", "Yo ho ho!")
CLOSERS = ("Savvy?", "Arr!", "Yo ho ho!", "Shiver me timbers!", "")


def _capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    question = rng.choice(("What is the capital of {c}?", "What's the capital of {c}?",
                           "Which city is the capital of {c}?", "Name the capital of {c}."))
    answer = rng.choice(("The capital o' {c} be {x}.", "{x} be the capital o' {c}.",
                         "That be {x}, the capital o' {c}."))
    return question.format(c=country), answer.format(c=country, x=city)


def _colour(rng: random.Random) -> tuple[str, str]:
    thing, colour = rng.choice(COLOURS)
    question = rng.choice(("What color is {t}?", "What colour is {t}?"))
    answer = rng.choice(("{T} be {k}.", "{T} be as {k} as can be.", "Why, {t} be {k}, o' course."))
    return question.format(t=thing), answer.format(t=thing, T=thing[0].upper() + thing[1:], k=colour)


def _sound(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(SOUNDS)
    question = rng.choice(("What sound does a {a} make?", "What noise does a {a} make?"))
    answer = rng.choice(("A {a} goes {s}, same as on me ship.", "The {a} says {s}, matey."))
    return question.format(a=animal), answer.format(a=animal, s=sound)


def _legs(rng: random.Random) -> tuple[str, str]:
    animal, legs = rng.choice(LEGS)
    subject = animal[0].upper() + animal[1:]
    if legs == 0:
        answer = f"{subject} has no legs at all, it slithers like a sea serpent."
    elif legs > 2:
        answer = f"{subject} has {legs} legs, more than me with me peg leg."
    else:
        answer = f"{subject} has {legs} legs, same as a sailor."
    return f"How many legs does {animal} have?", answer


def _opposite(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(OPPOSITES)
    answer = rng.choice(("The opposite o' {w} be {o}.", "That be {o}, matey."))
    return f"What is the opposite of {word}?", answer.format(w=word, o=other)


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    question = rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?"))
    return question.format(a=a, b=b), f"{a} plus {b} be {a + b}, by me count o' doubloons."


def _chat(rng: random.Random) -> tuple[str, str]:
    return rng.choice(CHAT)


GENERATORS: tuple[tuple[Callable[[random.Random], tuple[str, str]], int], ...] = (
    (_capital, 4), (_colour, 2), (_sound, 2), (_legs, 1), (_opposite, 2), (_sum, 2), (_chat, 3),
)


def generate_pirate_data(count: int, seed: int, chat: bool = False) -> list[Example]:
    """`count` distinct (prompt, completion) pairs, the same for the same seed. `chat`: the
    prompt is the user's message alone (main wraps it in the template) and the answer has no
    leading space."""
    rng = random.Random(seed)
    makers = [maker for maker, weight in GENERATORS for _ in range(weight)]
    examples: dict[str, Example] = {}
    attempts = 0
    while len(examples) < count and attempts < 50 * count:
        attempts += 1
        question, answer = rng.choice(makers)(rng)
        opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
        completion = " ".join(part for part in (opener, answer, closer) if part)
        prompt = question if chat else PROMPT_FORMAT.format(question=question)
        # One answer per question: two different answers to the same prompt would only blur it.
        examples.setdefault(question, Example(prompt, completion if chat else " " + completion))
    assert not set(DEMO_QUESTIONS) & set(examples), "a demo question leaked into the training data"
    return list(examples.values())


def read_jsonl(path: Path) -> list[Example]:
    """Your own data: one {"prompt": ..., "completion": ...} JSON object per line (with --chat,
    the prompt is the user's message)."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
                or not isinstance(record.get("completion"), str) or not record["completion"]:
            sys.exit(f"{path}:{number}: expected {{\"prompt\": str, \"completion\": non-empty str}}")
        examples.append(Example(record["prompt"], record["completion"]))
    if not examples:
        sys.exit(f"{path}: no examples")
    return examples


def write_jsonl(examples: Sequence[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"prompt": example.prompt, "completion": example.completion}) + "\n")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    first_target: int  # index of the first completion token in ids: the loss starts there


def encode(tokenizer, examples: Sequence[Example], add_eos: bool, max_tokens: int,
           end_token: str = "") -> list[Encoded]:
    """Tokenize prompt + completion as one text (as the runtime will see it) and find where the
    completion starts, so that only its tokens are learned. The model learns to stop with
    `end_token` (chat: <end_of_turn>, what ends a model turn) or else <eos>."""
    stop_id = tokenizer.convert_tokens_to_ids(end_token) if end_token else tokenizer.eos_token_id
    encoded = []
    for example in examples:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True).input_ids
        ids = tokenizer(example.prompt + example.completion, add_special_tokens=True).input_ids
        if ids[:len(prompt_ids)] != prompt_ids:
            # The completion merged with the prompt's last token: fall back to separate pieces.
            ids = prompt_ids + tokenizer(example.completion, add_special_tokens=False).input_ids
        if add_eos:
            ids = ids + [stop_id]
        if len(ids) > max_tokens:
            sys.exit(f"an example is {len(ids)} tokens, above --max-tokens {max_tokens}: {example.prompt[:60]!r}")
        encoded.append(Encoded(ids, len(prompt_ids)))
    return encoded


def batches(data: Sequence[Encoded], batch_size: int, steps: int, seed: int) -> Iterator[list[Encoded]]:
    """`steps` batches, epoch after epoch, each epoch in a seeded shuffled order."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(data)))
            rng.shuffle(epoch)
            order += epoch
        yield [data[i] for i in order[:batch_size]]
        del order[:batch_size]


def answer_loss(model, batch: Sequence[Encoded], pad_id: int, softcap: float | None) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of a right-padded batch.

    Runs the decoder stack on everything but the output layer only where a next token is
    learned: with a 262k vocabulary that layer is most of the work."""
    width = max(len(item.ids) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    learn = torch.zeros((len(batch), width), dtype=torch.bool)  # position t predicts ids[t + 1]
    for row, item in enumerate(batch):
        ids[row, :len(item.ids)] = torch.tensor(item.ids)
        mask[row, :len(item.ids)] = 1
        learn[row, item.first_target - 1:len(item.ids) - 1] = True
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_base_model().lm_head(hidden[learn])
    if softcap:  # Gemma 2 style final logit soft-cap; Gemma 3 has none
        logits = torch.tanh(logits / softcap) * softcap
    targets = torch.roll(ids, shifts=-1, dims=1)[learn]
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def save_adapter(model, out: Path, base_name: str) -> None:
    """PEFT's save_pretrained, in float16, plus the "model_type" localgemma/Workers AI need."""
    from safetensors import safe_open

    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float16)
    model.peft_config["default"].base_model_name_or_path = base_name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["model_type"] = "gemma"
    if isinstance(config.get("target_modules"), list):  # PEFT writes a set's order: it varies run to run
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    print(f"saved {out} ({(out / 'adapter_model.safetensors').stat().st_size / 1e6:.2f} MB, {sorted(dtypes)})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the base model's GGUF file")
    parser.add_argument("--hf-model", help="train on this transformers model instead (a Hugging Face id such as "
                                           "google/gemma-2b-it, or a local folder): the weights Workers AI and "
                                           "vLLM serve, unquantized")
    parser.add_argument("--chat", action="store_true",
                        help="learn answers to chat turns (messages requests) instead of raw prompts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PEFT adapter folder to write")
    parser.add_argument("--base-name", default="google/gemma-3-270m",
                        help="base_model_name_or_path recorded in adapter_config.json")
    parser.add_argument("--data", type=Path, help="your own JSONL {prompt, completion} data instead of the pirate set")
    parser.add_argument("--write-data", type=Path, help="write the training data as JSONL here and exit")
    parser.add_argument("--examples", type=int, default=320, help="how many pirate examples to generate")
    parser.add_argument("--no-eos", action="store_true", help="do not append <eos> to completions")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated projection names")
    parser.add_argument("--max-tokens", type=int, default=256, help="refuse examples longer than this")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (part of the reproducibility)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    seed_everything(args.seed, args.threads)
    examples = read_jsonl(args.data) if args.data else generate_pirate_data(args.examples, args.seed, args.chat)
    if args.write_data:
        write_jsonl(examples, args.write_data)
        print(f"wrote {len(examples)} examples to {args.write_data}")
        return
    if args.chat:  # the user's message, as localgemma renders a one-turn conversation
        examples = [Example(CHAT_FORMAT.format(question=e.prompt), e.completion) for e in examples]

    if not args.hf_model or Path(args.hf_model).is_dir():
        # Never reach for the Hugging Face hub unless asked to: the GGUF is on disk.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if args.hf_model:
        source, kwargs = args.hf_model, {}
    else:
        source, kwargs = str(args.gguf.parent), {"gguf_file": args.gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    print(f"loaded {args.hf_model or args.gguf.name} in {time.monotonic() - started:.0f} s; {len(examples)} examples")

    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                      target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.print_trainable_parameters()
    data = encode(tokenizer, examples, add_eos=not args.no_eos, max_tokens=args.max_tokens,
                  end_token="<end_of_turn>" if args.chat else "")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    softcap = getattr(base.config, "final_logit_softcapping", None)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)  # linear warm-up, then linear decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / (args.steps - warmup))))
    model.train()
    started, cpu_started = time.monotonic(), time.process_time()
    for step, batch in enumerate(batches(data, args.batch_size, args.steps, args.seed), start=1):
        loss = answer_loss(model, batch, pad_id, softcap)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  {time.monotonic() - started:6.1f} s", flush=True)
    print(f"trained in {time.monotonic() - started:.0f} s ({time.process_time() - cpu_started:.0f} s of CPU time)")
    save_adapter(model, args.out, args.base_name)


if __name__ == "__main__":
    main()

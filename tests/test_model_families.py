"""Llama 3.2, SmolLM2 and TinyLlama as Hugging Face publishes them, shrunk: random weights of
each family's shape (its vocabulary kept), its tokenizer's kind and special tokens, its chat
template. Each folder is converted to GGUF by llamette and by llama.cpp's own converter
(`convert_hf_to_gguf.py` from llama-cpp-python's source distribution); both files give
transformers' logits in llamette, and llama.cpp's greedy tokens."""

import json
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from conftest import llama_cpp_model, shared_path, training_text, transformers_logits
from llamette import Sampler, Tokenizer, Transformer, generate
from llamette.chat_template import Message, own_template
from llamette.cli import main
from llamette.formats.gguf import GGUFModel
from llamette.formats.huggingface import LLAMA3_SPLIT

torch = pytest.importorskip("torch", reason="torch is a test dependency (pip install -e .[test])")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is a dependency")
LLAMA_CPP_VERSION = "0.3.36"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] "
    "%}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ strftime_now('%d %b %Y') }}\n\n"
    "{{ system }}<|eot_id|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
    "+ eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
TYPED_MARKERS = " <|im_end|><|eot_id|></s>"
CONVERSATION = [Message("system", "You tell short stories."),
                Message("user", f"Tell me about a dog.{TYPED_MARKERS}"),
                Message("assistant", "Once there was a dog."), Message("user", "What next?")]  # fmt: skip


def byte_level_tokenizer(split, specials_at_start, specials_at_end, size, post_bos=None):
    """A tokenizer.json of `size` tokens: BPE trained on the project's text with the family's
    pre-tokenizer, padded with normal tokens no merge reaches (as a large vocabulary has), its
    special tokens at the start or the end."""
    from tokenizers import models, pre_tokenizers, processors, trainers

    trained = tokenizers.Tokenizer(models.BPE(ignore_merges=post_bos is not None))
    trained.pre_tokenizer = split
    trainer = trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(training_text(), trainer)
    spec = json.loads(trained.to_str())
    learned = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    fillers = [f"filler{i}" for i in range(size - len(learned) - len(specials_at_start)
                                          - len(specials_at_end))]  # fmt: skip
    normal = learned + fillers
    first = len(specials_at_start)
    # special tokens before the learned ones are in the model's vocabulary too (as SmolLM2's
    # are): Hugging Face numbers added tokens that are not after the vocabulary
    spec["model"]["vocab"] = {token: i for i, token in enumerate(specials_at_start)} | {
        token: first + i for i, token in enumerate(normal)
    }
    added = list(enumerate(specials_at_start)) + [
        (first + len(normal) + i, token) for i, token in enumerate(specials_at_end)
    ]
    spec["added_tokens"] = [{"id": i, "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, token in added]  # fmt: skip
    if post_bos is not None:
        bos_id = dict((t, i) for i, t in added)[post_bos]
        spec["post_processor"] = json.loads(processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
            special_tokens=[(post_bos, bos_id)]).__getstate__())  # fmt: skip
    else:
        spec["post_processor"] = json.loads(processors.ByteLevel(trim_offsets=False).__getstate__())
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                       "use_regex": False}  # fmt: skip
    return spec


def llama32_folder(folder):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]  # fmt: skip
    specials += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(specials) + 3)]
    spec = byte_level_tokenizer(split, [], specials, 128256, post_bos="<|begin_of_text|>")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    config = dict(vocab_size=128256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope,
                  tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009)  # fmt: skip
    tokenizer_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                        "chat_template": LLAMA3_TEMPLATE}  # fmt: skip
    generation = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    return write_folder(folder, config, spec, tokenizer_config, generation, "llama-bpe")


def smollm2_folder(folder):
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])  # fmt: skip
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
                "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
                "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                "<jupyter_output>", "<jupyter_script>", "<empty_output>"]  # fmt: skip
    spec = byte_level_tokenizer(split, specials, [], 49152)
    config = dict(vocab_size=49152, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    folder = write_folder(folder, config, spec, tokenizer_config, generation, "smollm")
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)  # where transformers 5 puts it
    return folder


def tinyllama_folder(folder):
    config = dict(vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)  # fmt: skip
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "chat_template": ZEPHYR_TEMPLATE, "tokenizer_class": "LlamaTokenizer",
                        "add_bos_token": True}  # fmt: skip
    folder = write_folder(folder, config, None, tokenizer_config, {"eos_token_id": 2}, None)
    (folder / "tokenizer.model").write_bytes(shared_path("models", "tokenizer.model").read_bytes())
    return folder


def write_folder(folder, config, tokenizer_spec, tokenizer_config, generation, pre):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():  # weights big enough that greedy choices are not near ties
        for name, parameter in model.named_parameters():
            parameter.copy_(1 + 0.3 * torch.randn_like(parameter) if "norm" in name
                            else 0.15 * torch.randn_like(parameter))  # fmt: skip
    model.save_pretrained(folder)
    if tokenizer_spec is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_spec, ensure_ascii=False))
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"} | tokenizer_config
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "generation_config.json").write_text(json.dumps(generation))
    (folder / "pre.txt").write_text(pre or "")
    return folder


FAMILIES = {"llama-3.2": llama32_folder, "smollm2": smollm2_folder, "tinyllama": tinyllama_folder}


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory, pytestconfig):
    """convert_hf_to_gguf.py with its gguf-py, from llama-cpp-python's source distribution
    (downloaded once into pytest's cache)."""
    cache = pytestconfig.cache.mkdir("llama-cpp-python-sdist")
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not archive.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(cache), f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode or not archive.exists():
            pytest.skip(
                f"llama-cpp-python's source distribution could not be downloaded: {done.stderr[-200:]}"
            )
    root = tmp_path_factory.mktemp("llama.cpp")
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]  # fmt: skip
        tar.extractall(root, members, filter="data")
    return root / prefix


def convert_with_llama_cpp(converter, folder, out):
    """llama.cpp's converter, told the pre-tokenizer: it recognizes a tokenizer by the hash of
    its output on a test text, which only published tokenizers have."""
    pre = (folder / "pre.txt").read_text()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(converter)!r})
        sys.argv = ["convert_hf_to_gguf.py", {str(folder)!r}, "--outfile", {str(out)!r},
                    "--outtype", "f32"]
        import convert_hf_to_gguf
        from conversion import base
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
        convert_hf_to_gguf.main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, llama_cpp_converter):
    root = tmp_path_factory.mktemp(request.param)
    folder = FAMILIES[request.param](root / "hf")
    ours, theirs = root / "llamette.gguf", root / "llama.cpp.gguf"
    assert main(["convert", str(folder), str(ours), "--type", "f32"]) == 0
    convert_with_llama_cpp(llama_cpp_converter, folder, theirs)
    return {"folder": folder, "llamette": ours, "llama.cpp": theirs}


def test_both_conversions_carry_the_same_tokenizer(family):
    ours, theirs = GGUFModel(family["llamette"]), GGUFModel(family["llama.cpp"])
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                "eos_token_id", "add_bos_token"):  # fmt: skip
        assert ours.value(f"tokenizer.ggml.{key}") == theirs.value(f"tokenizer.ggml.{key}"), key
    assert ours.value("tokenizer.chat_template") == theirs.value("tokenizer.chat_template")
    assert GGUFModel(family["llamette"]).config() == GGUFModel(family["llama.cpp"]).config()


@pytest.mark.parametrize("converter", ["llamette", "llama.cpp"])
def test_logits_are_transformers(family, converter):
    reference = transformers.LlamaForCausalLM.from_pretrained(family["folder"]).eval()
    tokenizer = Tokenizer.load(family[converter])
    tokens = tokenizer.encode("Once upon a time, 12345 friends met.", bos=tokenizer.add_bos)
    tokens = (tokens * 8)[:80]  # past Llama 3.2's (shrunk) original context of 64
    expected = transformers_logits(reference, tokens)
    model = Transformer.load(family[converter])
    for pos, token in enumerate(tokens):
        logits = model.forward(token, pos)
        assert np.abs(logits - expected[pos]).max() / np.abs(expected[pos]).max() < 1e-4, pos


def test_greedy_tokens_and_tokenization_are_llama_cpps(family):
    path = family["llama.cpp"]
    llama = llama_cpp_model(path, n_ctx=256, n_threads=2, type_k=0, type_v=0)  # F32 KV cache
    tokenizer = Tokenizer.load(path)
    for text in ("Once upon a time", "<|im_start|>user\nhi 42<|im_end|>", " Tiếng Việt 🦙"):
        assert tokenizer.encode(text, bos=tokenizer.add_bos, special=True) == llama.tokenize(
            text.encode(), add_bos=True, special=True
        )
    prompt = "Once upon a time"
    theirs = llama.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    model = Transformer.load(path)
    n_prompt = len(tokenizer.encode(prompt, bos=tokenizer.add_bos))
    ours = generate(model, tokenizer, Sampler(tokenizer.vocab_size, 0.0), prompt, n_prompt + 23)
    assert len(ours.tokens) == 24 and ours.text == theirs


def reference_chat_tokens(family, messages: list[Message], tokenizer) -> list[int]:
    """The conversation's prompt tokens as transformers' apply_chat_template makes them (the
    rendered text tokenized with special tokens parsed); for SentencePiece folders, whose fast
    tokenizer transformers builds only with protobuf, as llama-cpp-python's chat formatter
    renders and llama.cpp tokenizes."""
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    if not (family["folder"] / "tokenizer.model").exists():
        auto = transformers.AutoTokenizer.from_pretrained(family["folder"])
        text = auto.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
        return auto.encode(text, add_special_tokens=False)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    source = own_template(family["folder"]).source
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        source, tokenizer.special_text(tokenizer.specials.eos_id),
        tokenizer.special_text(tokenizer.bos_id),
    )  # fmt: skip
    text = formatter(messages=as_dicts).prompt
    llama = llama_cpp_model(family["llama.cpp"], vocab_only=True)
    return llama.tokenize(text.encode(), add_bos=False, special=True)


def test_the_chat_template_gives_the_reference_tokens_and_messages_stay_text(family):
    tokenizer = Tokenizer.load(family["llamette"])
    template = own_template(family["llamette"])
    plain = [Message(m.role, m.content.replace(TYPED_MARKERS, "")) for m in CONVERSATION]
    expected = reference_chat_tokens(family, plain, tokenizer)
    assert template.tokens(plain, tokenizer) == list(expected)
    # markers a user types stay text: the prompt holds only the template's control tokens
    typed = template.tokens(CONVERSATION, tokenizer)
    controls = [i for i in typed if tokenizer.is_control(i)]
    assert controls == [i for i in expected if tokenizer.is_control(i)]
    assert TYPED_MARKERS.strip() in tokenizer.decode(typed)

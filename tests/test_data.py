"""The built-in corpus, tokenization, local files through `datasets`, and the loaders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ds_bitter7 import data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus_cache"))


def test_corpus_is_deterministic_and_cached(cache):
    first = data.builtin_documents(cache)
    path = data.corpus_cache_path(cache)
    assert os.path.exists(path)
    mtime = os.path.getmtime(path)
    second = data.builtin_documents(cache)
    assert os.path.getmtime(path) == mtime  # read back, not rebuilt
    assert first == second == data._stdlib_documents()
    assert [d["name"] for d in first] == sorted(d["name"] for d in first)
    assert sum(len(d["text"]) for d in first) > 1_000_000
    # a damaged cache (truncated, emptied) is built again, not a JSON error naming no file
    for damaged in (open(path, encoding="utf-8").read()[:1000], ""):
        with open(path, "w", encoding="utf-8") as f:
            f.write(damaged)
        assert data.builtin_documents(cache) == first


def test_split_is_disjoint_and_small(cache):
    train = data.builtin_dataset("train", cache)
    val = data.builtin_dataset("validation", cache)
    assert not set(train["name"]) & set(val["name"])
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.12
    assert data.split_of("stdlib/os.py") == data.split_of("stdlib/os.py")


def test_missing_tokenizer_folder_is_named(tmp_path):
    for path in (str(tmp_path / "tok"), "./no/such/tok"):
        with pytest.raises(ValueError, match="tokenizer '.*tok': no such folder"):
            data.get_tokenizer(path)


def test_byte_tokenizer_roundtrip():
    tok = data.ByteTokenizer()
    text = "Structured pruning — naïve ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_token_id]) == text
    assert len(tok) == 257


def test_blocks_have_fixed_length_and_eos():
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a" * 50}, {"text": "b" * 50}])
    blocks = data.chunk_dataset(ds, data.ByteTokenizer(), 16)
    assert len(blocks) == 102 // 16
    flat = torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))])
    assert flat[50].item() == 256 and flat[:50].eq(ord("a")).all()


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_local_files_through_datasets(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lines = [f"document {i} of a small local corpus\nwith a second line" for i in range(40)]
    if kind == "text":  # documents separated by blank lines; the newline inside each is kept
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(lines) + "\n")
    else:
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    train, val = data.load_text_datasets(str(path), validation_fraction=0.1, seed=0)
    assert len(train) == 36 and len(val) == 4
    assert sorted(list(train["text"]) + list(val["text"])) == sorted(lines)
    train2, _ = data.load_text_datasets(str(path), validation_fraction=0.1, seed=0)
    assert list(train2["text"]) == list(train["text"])
    blocks = data.chunk_dataset(train, data.ByteTokenizer(), 32)
    assert blocks[0]["input_ids"].shape == (32,)


def test_bad_local_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"id": "doc-1", "content": "words"}) + "\n")
    (tmp_path / "one.txt").write_text("one document on one line\n")
    (tmp_path / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(3)))
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n{"text": 5}\n{"text": null}\n')
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n{"id": 1}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    (tmp_path / "broken.json").write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')
    for name, message in (("empty.txt", "empty data file"), ("blank.txt", "only whitespace"),
                          ("other.jsonl", "needs a 'text' field; the records have \\['id', 'content'\\]"),
                          ("numbers.jsonl", "'text' field of every JSON record must be a string; record 0 "
                           "\\(counting from 0 over the files\\) holds 0"),
                          ("mixed.jsonl", "must be a string; record 1 .* holds 5"),
                          ("nulls.jsonl", "must be a string; in every record it is null or missing"),
                          # datasets said only "An error occurred while generating the dataset"
                          ("broken.jsonl", "broken.jsonl:2: Expecting ',' delimiter \\(column 13\\)"),
                          ("broken.json", "broken.json:4: Expecting ',' delimiter"),
                          ("one.txt", "hold one document")):
        with pytest.raises(ValueError, match=message):
            data.load_text_datasets(str(tmp_path / name))
    # a named file of another type was read as text (a CSV's header a document; a .gz "not UTF-8")
    (tmp_path / "rows.csv").write_text("id,text\n1,words\n")
    with pytest.raises(ValueError, match=r"unsupported data file type: \['.*rows.csv'\] \(supported: .txt/"):
        data.load_text_datasets([str(tmp_path / "one.txt"), str(tmp_path / "rows.csv")])
    (tmp_path / "wiki.train.raw").write_text("first document\n\nsecond document\n")  # other names: plain text
    assert data.read_local_files([str(tmp_path / "wiki.train.raw")])["text"] == ["first document", "second document"]
    # JSON lines that are not UTF-8: the reader takes the bytes, their decoding failed naming no file
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + b"\xe9\"}\n")
    with pytest.raises(ValueError, match=r"\['.*latin1.jsonl'\]: not UTF-8 text"):
        data.load_text_datasets([str(tmp_path / "latin1.jsonl")])


def test_text_documents_split_at_blank_or_whitespace_lines(tmp_path):
    (tmp_path / "wiki.txt").write_text(" = Title = \n \n First line\nsecond line\n \n Next\n")
    assert data._text_documents(str(tmp_path / "wiki.txt")) == [" = Title = ", " First line\nsecond line", " Next"]
    (tmp_path / "lines.txt").write_text("doc one\ndoc two\n")  # no blank line: one document per line
    assert data._text_documents(str(tmp_path / "lines.txt")) == ["doc one", "doc two"]


def test_folder_with_json_data_ignores_its_readme(tmp_path):
    (tmp_path / "README.md").write_text("# about this data\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    assert data.local_files([str(tmp_path)]) == [str(tmp_path / "a.jsonl")]


def test_loader_shards_by_rank_and_calibration_uses_train():
    import datasets

    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 8 for i in range(20)]})
    blocks.set_format("torch", columns=["input_ids"])
    seen = []
    for rank in range(2):
        loader = data.make_dataloader(blocks, 5, seed=3, world_size=2, rank=rank)
        seen.append(torch.cat([b["input_ids"][:, 0] for b in loader]).tolist())
    assert not set(seen[0]) & set(seen[1]) and len(seen[0] + seen[1]) == 20
    calib = data.calibration_batches(blocks, batch_size=3, num_batches=2)
    assert len(calib) == 2 and calib[0]["input_ids"].shape == (3, 8)
    assert calib[0]["input_ids"].dtype == torch.long


def test_builtin_models_build():
    from ds_bitter7 import modeling

    llama = modeling.build_model("tiny-llama", 257, overrides={"num_hidden_layers": 1})
    assert llama.config.num_key_value_heads == 2 and llama.config.vocab_size == 264
    gpt2 = modeling.build_model("tiny-gpt2", 257, overrides={"n_layer": 1, "n_embd": 32})
    again = modeling.build_model("tiny-gpt2", 257, overrides={"n_layer": 1, "n_embd": 32})
    assert torch.equal(gpt2.transformer.wte.weight, again.transformer.wte.weight)  # seeded
    ids = torch.randint(0, 257, (2, 16))
    assert gpt2(input_ids=ids, labels=ids).loss.isfinite()
    assert modeling.build_config("tiny-gpt2", 257, overrides={"vocab_size": 512}).vocab_size == 512
    for vocab, message in ((100, "tokenizer has 257 ids but model 'tiny-gpt2' only 100"),
                           ("512", "vocab_size override must be a positive integer, got '512'")):
        with pytest.raises(ValueError, match=message):
            modeling.build_config("tiny-gpt2", 257, overrides={"vocab_size": vocab})


def test_local_model_with_weights_is_checked_and_overridden(tmp_path):
    from ds_bitter7 import modeling

    modeling.build_model("tiny-gpt2", 257, 64, overrides={"n_layer": 1, "n_embd": 32}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer has 50000 ids but model"):
        modeling.build_model(str(tmp_path), vocab_size=50000)
    loaded = modeling.build_model(str(tmp_path), vocab_size=257, overrides={"resid_pdrop": 0.3})
    assert loaded.config.resid_pdrop == 0.3
    assert modeling.build_config("tiny-llama", vocab_size=32000, eos_token_id=2).eos_token_id == 2
    assert modeling.build_config("tiny-gpt2", 257).eos_token_id == 256  # the byte tokenizer's
    no_eos = modeling.build_config("tiny-gpt2", 300, eos_token_id=None)  # a tokenizer without one
    assert no_eos.eos_token_id is None and no_eos.bos_token_id is None  # not its ordinary last token
    # a config keeps any keyword: a misspelt size trained the default model without a word
    with pytest.raises(ValueError, match="a gpt2 config has no 'n_embed' \\(did you mean 'n_embd'\\?\\)"):
        modeling.build_config("tiny-gpt2", 257, overrides={"n_embed": 32})
    with pytest.raises(ValueError, match="a llama config has no 'num_layers'"):
        modeling.build_model("tiny-llama", 257, overrides={"num_layers": 2})
    with pytest.raises(ValueError, match="a gpt2 config has no 'n_layers'"):
        modeling.build_model(str(tmp_path), vocab_size=257, overrides={"n_layers": 2})  # a local folder's config
    # keys a config consumes under another name, or reads in its __init__ only, are no typos
    llama = modeling.build_config("tiny-llama", 257, overrides={"rope_theta": 5e5, "attn_implementation": "eager",
                                                                "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert llama.rope_parameters["factor"] == 2.0 and llama._attn_implementation == "eager"
    # an exported model's per-block widths: fewer layers than they list trained, then failed at the save
    from ds_bitter7.models import Bitter7LlamaConfig

    Bitter7LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, intermediate_sizes=[64, 32]).save_pretrained(tmp_path / "export")
    with pytest.raises(ValueError, match="the bitter7_llama config refuses them.*intermediate_sizes has 2 entries"
                                         r".* \(override intermediate_sizes too: one entry per block\)$"):
        modeling.build_config(str(tmp_path / "export"), overrides={"num_hidden_layers": 1})
    from ds_bitter7.models import Bitter7GPT2Config  # GPT-2 names the layer count n_layer

    Bitter7GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0,
                      intermediate_sizes=[64, 32], num_heads_per_layer=[2, 1]).save_pretrained(tmp_path / "gpt2_export")
    with pytest.raises(ValueError, match=r"\(override intermediate_sizes, num_heads_per_layer too: one entry per block\)$"):
        modeling.build_config(str(tmp_path / "gpt2_export"), overrides={"n_layer": 1})
    # a Qwen2 config lists each block's attention type: fewer layers need a shorter list too
    from transformers import Qwen2Config

    Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match=r"\(override layer_types too: one entry per block\)$"):
        modeling.build_config(str(tmp_path / "qwen2"), overrides={"num_hidden_layers": 1})
    shorter = modeling.build_config(str(tmp_path / "qwen2"), overrides={"num_hidden_layers": 1,
                                                                        "layer_types": ["full_attention"]})
    assert shorter.num_hidden_layers == 1
    # a saved config.json holds head_dim: a width override kept it (4 heads of 8 in a 64-wide model)
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "llama")
    for overrides, head_dim in (({"hidden_size": 64}, 16), ({"num_attention_heads": 8, "num_key_value_heads": 8}, 4),
                                ({"hidden_size": 64, "head_dim": 8}, 8)):
        assert modeling.build_config(str(tmp_path / "llama"), overrides=overrides).head_dim == head_dim, overrides
    chosen = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16)  # not derived: kept
    chosen.save_pretrained(tmp_path / "llama_wide_heads")
    assert modeling.build_config(str(tmp_path / "llama_wide_heads"), overrides={"hidden_size": 64}).head_dim == 16
    # a run made before that resumes with its own command: told how to keep its head_dim
    wider = modeling.build_config(str(tmp_path / "llama"), overrides={"hidden_size": 64})
    assert 'add "head_dim": 8 to --model_overrides' in modeling.model_mismatch({**wider.to_dict(), "head_dim": 8}, wider)
    # not where head_dim differs because the widths do, or where this run's head_dim is not derived
    narrower = modeling.build_config(str(tmp_path / "llama"))
    assert modeling.model_mismatch(narrower.to_dict(), wider) == "hidden_size=32 where this run's has 64, head_dim=8 where this run's has 16"
    chosen = modeling.build_config(str(tmp_path / "llama_wide_heads"))  # 4 heads of 16 in a 32-wide model
    assert modeling.model_mismatch({**chosen.to_dict(), "head_dim": 8}, chosen) == "head_dim=8 where this run's has 16"


def test_typos_of_builtin_names_are_refused_before_the_hub():
    from ds_bitter7 import modeling

    with pytest.raises(ValueError, match="data 'builtn' .* did you mean 'builtin'"):
        data.load_text_datasets(["builtn"])
    with pytest.raises(ValueError, match="model 'tiny-gtp2' .* did you mean 'tiny-gpt2'"):
        modeling.build_config("tiny-gtp2")


def test_overrides_that_make_no_model_are_named(tmp_path):
    """Sizes no model can have passed every check, then failed in the first forward (a shape error
    naming no key), in a division by zero, or in the config's own validation, as a traceback."""
    from transformers import LlamaConfig

    from ds_bitter7 import modeling

    for name, overrides, problem in (
            ("tiny-gpt2", {"n_positions": 0}, "n_positions = 0: not a positive integer"),
            ("tiny-gpt2", {"n_head": 0}, "n_head = 0: not a positive integer"),
            ("tiny-gpt2", {"n_inner": 0}, "n_inner = 0: not a positive integer"),
            ("tiny-gpt2", {"n_embd": 30}, "n_embd = 30 is not a multiple of n_head = 4"),
            ("tiny-llama", {"num_key_value_heads": 3}, "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
            ("tiny-gpt2", {"n_layer": "2"}, "Field 'n_layer' expected int, got str")):
        with pytest.raises(ValueError, match=problem) as err:
            modeling.build_config(name, 257, overrides=overrides)
        assert json.dumps(overrides) in str(err.value) or "refuses them" in str(err.value)
    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="intermediate_size = -1: not a positive integer"):
        modeling.build_config(str(tmp_path / "llama"), overrides={"intermediate_size": -1})
    assert modeling.max_positions(modeling.build_config("tiny-gpt2", max_positions=64)) == 64


def test_hub_dataset_configuration_reaches_load_dataset(tmp_path, monkeypatch):
    """A hub name with a configuration (wikitext needs one): datasets' own load_dataset reads it,
    here from a local dataset repository of two configurations standing in for the hub (offline)."""
    import datasets

    repo = tmp_path / "repo"
    for name, n in (("small", 4), ("large", 12)):
        (repo / name).mkdir(parents=True)
        for split in ("train", "validation"):
            (repo / name / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} document {i}"}) + "\n"
                                                                for i in range(n)))
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
        f"  - split: validation\n    path: {name}/validation.jsonl\n" for name in ("small", "large")) + "---\n")
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: real(str(repo), config)
                        if name == "org/corpus" else pytest.fail(f"load_dataset({name!r})"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    train, val = data.load_text_datasets(["org/corpus"], hub_config="large")
    assert len(train) == len(val) == 12 and val[0]["text"] == "validation document 0"
    with pytest.raises(ValueError, match=r"configuration \('large'\) is for a hub dataset name, not for \['builtin'\]"):
        data.load_text_datasets(["builtin"], hub_config="large")


def test_blocks_lose_at_most_one_partial_block_of_the_whole_text():
    """Documents are mapped 1000 at a time; the tokens left at the end of each batch are joined
    into blocks too (they were dropped: a third of the text at 8192 tokens)."""
    import datasets

    docs = [f"short line number {i:05d}" for i in range(2500)]  # 23 bytes and an end-of-document id each
    ds = datasets.Dataset.from_dict({"text": docs})
    tokens = sum(len(d.encode()) + 1 for d in docs)
    for seq_len in (64, 8192, 20000):
        blocks = data.chunk_dataset(ds, data.ByteTokenizer(), seq_len)
        assert len(blocks) == tokens // seq_len, seq_len
    first = torch.tensor(list(docs[0].encode()) + [data.eos_id(data.ByteTokenizer())])
    assert torch.equal(data.chunk_dataset(ds, data.ByteTokenizer(), 64)[0]["input_ids"][:len(first)], first)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        data.chunk_dataset(ds, data.ByteTokenizer(), 1)


def test_local_data_edge_cases(tmp_path, monkeypatch, caplog):
    """A file named twice (a folder and a file in it) is read once: it would land in both splits; a
    byte-order mark is not text; JSON records without text are counted in a warning; a mistyped
    file path is named, not sent to the hub."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("\ufefffirst document\n\nsecond document\n", encoding="utf-8")
    assert data.local_files([str(tmp_path / "d"), str(tmp_path / "d" / "a.txt")]) == [str(tmp_path / "d" / "a.txt")]
    assert data._text_documents(str(tmp_path / "d" / "a.txt")) == ["first document", "second document"]
    (tmp_path / "part.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"} if i % 2 else {"content": "x"}) + "\n"
                                                 for i in range(6)))
    with caplog.at_level("WARNING", logger="ds_bitter7.data"):
        assert len(data.read_local_files([str(tmp_path / "part.jsonl")])) == 3
    assert "3 of 6 JSON records have no 'text' (missing or null): skipped" in caplog.text
    for typo in ("data/train.txt", "./corpus"):
        with pytest.raises(ValueError, match=f"data path '{typo}' does not exist"):
            data.load_text_datasets([typo])


def test_folder_scan_skips_hidden_files_and_names_an_empty_folder(tmp_path):
    """macOS's ``._a.txt`` copies (binary) failed as 'not UTF-8 text'; upper-case suffixes were
    skipped; a folder of folders gave 'no files given' without naming the folder."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.TXT").write_text("one\n\ntwo\n")
    (tmp_path / "d" / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    assert data.local_files([str(tmp_path / "d")]) == [str(tmp_path / "d" / "a.TXT")]
    (tmp_path / "top" / "inner").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no .* files in the folder '.*top' \(its subfolders \['inner'\] are not searched"):
        data.load_text_datasets([str(tmp_path / "top")])

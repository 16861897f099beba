"""Tokenizers: load one from a checkpoint directory, or build a small one offline.

``load_tokenizer(path)`` returns a ``transformers.PreTrainedTokenizerFast`` (never remote code) and
makes sure the InternVL special tokens exist: ``<img> </img> <IMG_CONTEXT> <quad> </quad> <ref>
</ref> <box> </box>`` (added in that order, so their ids are consecutive, as the upstream fine-tune
script does) and that the chat-template tokens (``<|im_start|>``, ``<|im_end|>``, ``<|end|>`` ...)
are special.

``build_offline_tokenizer()`` trains a byte-level BPE (~3k tokens) with the ``tokenizers`` library on a
text generated deterministically from an embedded word list, so it is identical on every machine
and needs no download. Byte-level fallback means any text (incl. Chinese) encodes.
"""

from __future__ import annotations

from pathlib import Path

from interleaf.errors import CheckpointError

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNVL_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

# Chat-template tokens per template: (tokens that must be special, end-of-turn token).
TEMPLATE_TOKENS = {
    "Hermes-2": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "internlm2-chat": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "internvl2_5": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "phi3-chat": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
}

# Special tokens of the offline tokenizer, before the InternVL ones.
OFFLINE_SPECIALS = [
    "<|endoftext|>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip


def ensure_special_tokens(tok, template: str | None = None) -> None:
    """Add missing InternVL / chat tokens to ``tok`` (a PreTrainedTokenizerFast), in upstream order."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    chat = TEMPLATE_TOKENS.get(template or "", ([], None))[0]
    existing_special = set(tok.all_special_tokens) | {
        t.content for t in tok.added_tokens_decoder.values() if getattr(t, "special", False)
    }
    missing_chat = [t for t in chat if t not in vocab or t not in existing_special]
    if missing_chat:
        tok.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True) for t in missing_chat]},
            replace_extra_special_tokens=False,
        )
    missing = [t for t in INTERNVL_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)


def load_tokenizer(path: str | Path, template: str | None = None):
    """Tokenizer of a checkpoint directory: ``tokenizer.json``, else a byte-level BPE stored as
    ``vocab.json`` + ``merges.txt`` (the Qwen2 tokenizers of InternVL2-1B, InternVL2.5-1B/4B), else a
    converted sentencepiece ``tokenizer.model``.

    ``template`` names the chat template whose tokens must be special (see ``TEMPLATE_TOKENS``).
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        overrides = _without_named_tokens(path)  # outside the try: names a broken tokenizer_config.json
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), **overrides)
        except Exception as exc:  # noqa: BLE001 - report any parse failure as one line
            raise CheckpointError(
                f"{path / 'tokenizer.json'}: cannot load tokenizer ({str(exc).splitlines()[0]})"
            ) from None
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = tokenizer_from_vocab_merges(path)
    elif (path / "tokenizer.model").is_file():
        tok = tokenizer_from_sentencepiece(path)
    else:
        raise CheckpointError(
            f"{path}: no tokenizer.json (nor vocab.json + merges.txt, nor a sentencepiece tokenizer.model) "
            "in the checkpoint directory"
        )
    ensure_special_tokens(tok, template)
    return tok


def tokenizer_from_vocab_merges(path: str | Path):
    """A byte-level BPE stored the "slow" way: ``vocab.json`` + ``merges.txt`` (+ ``added_tokens.json``).

    The class is the ``tokenizer_class`` of ``tokenizer_config.json`` (``Qwen2Tokenizer`` in the
    InternVL checkpoints built on Qwen2 / Qwen2.5); it must be a class of transformers itself, as
    remote code is never loaded. transformers builds the fast tokenizer from the two files (its
    pre-tokenizer regex, its added tokens) exactly as ``AutoTokenizer`` does.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{config_file}: missing; it must name the tokenizer_class of vocab.json + merges.txt"
        )
    config = _tokenizer_config(path)
    name = config.get("tokenizer_class")
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"{config_file}: field 'tokenizer_class' must name the tokenizer of vocab.json + merges.txt"
        )
    # transformers 4.x keeps "Qwen2Tokenizer" (slow) apart from "Qwen2TokenizerFast"; 5.x merged them
    candidates = [name] if name.endswith("Fast") else [name + "Fast", name]
    found = [tokenizer_class_from_name(n) for n in candidates]
    cls = next((c for c in found if c is not None and issubclass(c, PreTrainedTokenizerFast)), None)
    if cls is None:
        raise CheckpointError(
            f"{config_file}: tokenizer_class {name!r} is not a transformers tokenizer that reads "
            "vocab.json + merges.txt (remote code is never loaded)"
        )
    overrides = _without_named_tokens(path)
    try:
        return cls.from_pretrained(str(path), **overrides)
    except Exception as exc:  # noqa: BLE001 - report any parse failure as one line
        raise CheckpointError(
            f"{path / 'vocab.json'}: cannot load tokenizer ({str(exc).splitlines()[0]})"
        ) from None


def _tokenizer_config(path: Path) -> dict:
    """``tokenizer_config.json`` of a checkpoint ({} when absent). A broken one is an error naming it:
    left to transformers, its parse error would be reported against ``tokenizer.json``."""
    import json

    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{config_file}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def _without_named_tokens(path: Path) -> dict:
    """Loading overrides that leave out the processor's named tokens (``video_token`` ...).

    An ``-hf`` checkpoint names them in ``tokenizer_config.json`` (``extra_special_tokens`` as a dict,
    or top-level ``*_token`` keys after a re-save); transformers would append any that is missing
    (``<video>``) to the vocabulary. interleaf does not use them, so the tokenizer stays as stored.
    """
    config = _tokenizer_config(path)
    overrides: dict = {name: None for name in HF_NAMED_TOKENS if name in config}
    if isinstance(config.get("extra_special_tokens"), dict):
        plain = config.get("additional_special_tokens")
        overrides["extra_special_tokens"] = list(plain) if isinstance(plain, list) else []
    return overrides


# ----------------------------------------------------------------------------- sentencepiece
def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_sentencepiece(path: str | Path):
    """Convert a checkpoint's sentencepiece ``tokenizer.model`` (InternLM2 / Llama style) to a fast tokenizer.

    Offline and without the ``sentencepiece`` package or remote code: the model protobuf is parsed with
    ``protobuf``; pieces become a ``tokenizers`` BPE (merges derived from the piece vocabulary, id order
    = merge priority) or Unigram model with byte fallback; spaces map to ``▁`` with the dummy prefix when
    the model asks for it (the "legacy" behaviour of the slow Llama / InternLM2 tokenizers); control
    pieces become special tokens; ``tokenizer_config.json`` supplies ``add_bos_token``, the special
    token names and the extra added tokens (``added_tokens_decoder``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    path = Path(path)
    model_file = path / "tokenizer.model"
    try:
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise CheckpointError(
            f"{model_file}: not a sentencepiece model ({str(exc).splitlines()[0]})"
        ) from None
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if not pieces:
        raise CheckpointError(f"{model_file}: sentencepiece model has no pieces")
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unk = pieces[spec.unk_id][0] if 0 <= spec.unk_id < len(pieces) else None
    if spec.model_type == 1:  # unigram
        model = models.Unigram(
            [(p, s) for p, s, _ in pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback
        )
    elif spec.model_type == 2:  # BPE
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = generate_merges(vocab)
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    else:
        raise CheckpointError(f"{model_file}: unsupported sentencepiece model type {spec.model_type}")
    tk = Tokenizer(model)
    dummy_prefix = norm.add_dummy_prefix if norm.HasField("add_dummy_prefix") else True
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    # control pieces (type 3) are special tokens; user-defined pieces (type 4) are matched whole
    tk.add_tokens([AddedToken(p, special=t == 3, normalized=False) for p, _, t in pieces if t in (3, 4)])

    config_file = path / "tokenizer_config.json"
    config = _tokenizer_config(path)
    added = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
    for tid, entry in added:
        content, special = entry.get("content"), bool(entry.get("special", True))
        if not content:
            continue
        if tk.token_to_id(content) is None:
            if int(tid) != tk.get_vocab_size(with_added_tokens=True):
                raise CheckpointError(
                    f"{config_file}: added token {content!r} has id {tid}, not the next free id"
                )
            tk.add_tokens([AddedToken(content, special=special, normalized=False)])
        elif special:
            tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    names = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    bos = names["bos_token"] or (pieces[spec.bos_id][0] if 0 <= spec.bos_id < len(pieces) else None)
    eos = names["eos_token"] or (pieces[spec.eos_id][0] if 0 <= spec.eos_id < len(pieces) else None)
    if config.get("add_bos_token", True) and bos is not None and tk.token_to_id(bos) is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=names["unk_token"] or unk,
        pad_token=names["pad_token"],
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- offline BPE
_WORDS = """the of and to in is a that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no what up out more about
into them can only other new some could time these two may then do first any my now such like our over man
me even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since
against go came right used take three image picture photo video frame page text word line left right top bottom
red green blue yellow black white dark light small large big tiny round square cat dog bird car tree house
street city road sky water river mountain person woman child table chair book paper screen window door wall
answer question describe what where which who why how many count number show find point box region object
model vision language chart table figure document scene color shape size left middle center above below near
far inside outside one two three four five six seven eight nine ten hundred thousand first second third yes
""".split()

_PUNCT = [". ", ", ", "? ", "! ", ": ", "; ", "\n", " - ", " (", ") ", '"', "'s "]


def offline_training_text(n_sentences: int = 6000, seed: int = 1234) -> list[str]:
    """A fixed pseudo-English corpus (LCG-driven, identical on every machine)."""
    state = seed
    out = []

    def rnd(n: int) -> int:
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (state >> 33) % n

    for _ in range(n_sentences):
        words = [_WORDS[rnd(len(_WORDS))] for _ in range(3 + rnd(12))]
        if rnd(4) == 0:
            words.insert(rnd(len(words)), str(rnd(2000)))
        if rnd(3) == 0:
            words[0] = words[0].capitalize()
        s = " ".join(words) + _PUNCT[rnd(len(_PUNCT))]
        out.append(s)
    # digits and common symbols so they get merges too
    out.extend(f"{i} {i * 7 % 1000}.{i % 10} [{i}, {i + 1}] <{i}>" for i in range(500))
    return out


def build_offline_tokenizer(vocab_size: int = 3000, bos: bool = False):
    """Train a small byte-level BPE offline; return a PreTrainedTokenizerFast with the chat specials
    and the InternVL tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ... consecutive).

    ``bos=True`` makes it prepend ``<s>`` like the InternLM2 / Phi-3 tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=OFFLINE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(offline_training_text(), trainer=trainer)
    if bos:
        bos_id = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>" if bos else None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=OFFLINE_SPECIALS[4:],
        clean_up_tokenization_spaces=False,
    )
    ensure_special_tokens(tok)
    return tok


# ----------------------------------------------------------------------------- transformers processor
# Named tokens that transformers' ``InternVLProcessor`` reads from the tokenizer (``tokenizer.start_image_token``
# ...), written to ``tokenizer_config.json`` as ``extra_special_tokens`` like the upstream converter does.
HF_NAMED_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": "<video>",
}


def _jinja_str(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON escapes are valid Jinja escapes)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def hf_chat_template(template, bos_token: str | None = None) -> str:
    """A Jinja chat template for transformers' processor that renders exactly like ``template``.

    ``template`` is an :class:`interleaf.processing.templates.ChatTemplate` (its system message,
    default or a checkpoint's, is baked in; a leading ``system`` message replaces it). Message
    content is a string or a list of ``{"type": "image" | "video" | "text"}`` items: an image becomes
    ``<IMG_CONTEXT>\\n`` (``Image-k: <IMG_CONTEXT>\\n`` when the message has several, as interleaf's
    prompt builder writes them), a video ``<video>\\n``; the processor then expands both into image
    tokens. ``bos_token`` is prepended when the tokenizer adds one (the processor then tokenizes
    without adding it again).
    """
    sys_pre, sys_post = template.system_template.split("{system_message}")
    user, assistant = (_jinja_str(r) for r in template.roles)
    sep = _jinja_str(template.sep)
    ctx, video = _jinja_str(IMG_CONTEXT + "\n"), _jinja_str("<video>\n")
    bos = "{{- bos_token -}}" if bos_token else ""
    return (
        f"{{%- set ns = namespace(system={_jinja_str(template.system_message)}, k=0) -%}}"
        "{%- set loop_messages = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = '' -%}{%- for c in messages[0]['content'] -%}"
        "{%- if c['type'] == 'text' -%}{%- set ns.system = ns.system + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endif -%}"
        f"{bos}{{{{- {_jinja_str(sys_pre)} + ns.system + {_jinja_str(sys_post)} + {sep} -}}}}"
        "{%- for message in loop_messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {user} -}}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{- {assistant} -}}}}"
        "{%- else -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}"
        "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set ns.k = 0 -%}"
        "{%- for c in message['content'] -%}"
        "{%- if c['type'] == 'image' -%}{%- set ns.k = ns.k + 1 -%}"
        "{%- if n_images > 1 -%}{{- 'Image-' ~ ns.k ~ ': ' -}}{%- endif -%}"
        f"{{{{- {ctx} -}}}}"
        f"{{%- elif c['type'] == 'video' -%}}{{{{- {video} -}}}}"
        "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        f"{{{{- {sep} -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {assistant} -}}}}{{%- endif -%}}"
    )

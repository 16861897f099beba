"""Seed questions and answer-format suffixes for instruction generation (MMInstruct's steps c and d).

A *seed bank* maps a domain to seed question templates per kind and language, in the layout of the
official ``data_engine/all_seed/000NN_<domain>.json`` files::

    {"judge": {"English": [...], "Chinese": [...]},     # judgement (yes/no) questions
     "choice": {"English": [...], "Chinese": [...]},    # multiple-choice questions
     "sentence": {"English": [...], "Chinese": [...]}}  # open questions (long and short VQA)

Text in ``<angle brackets>`` inside a seed is a placeholder the generating LLM must fill in from the
image description. *Suffixes* follow ``data_engine/end_prompt.json``: ``{"longsentence" |
"shortsentence" | "judge" | "select": {"English": [...], "Chinese": [...]}}``; one is appended to
each generated question to fix the answer's form.

The built-in seeds and suffixes below are interleaf's own wording for a handful of the official
domains; pass the official files (or your own in that layout) to cover all of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from interleaf.errors import InputError, cannot_read

TYPES = ("judge", "choice", "long", "short")
SEED_KIND = {"judge": "judge", "choice": "choice", "long": "sentence", "short": "sentence"}
SUFFIX_KIND = {"judge": "judge", "choice": "select", "long": "longsentence", "short": "shortsentence"}
LANGS = {"en": "English", "zh": "Chinese"}


def _seeds(judge_en, judge_zh, choice_en, choice_zh, sentence_en, sentence_zh) -> dict:
    return {
        "judge": {"English": judge_en, "Chinese": judge_zh},
        "choice": {"English": choice_en, "Chinese": choice_zh},
        "sentence": {"English": sentence_en, "Chinese": sentence_zh},
    }


BUILTIN_SEEDS: dict[str, dict] = {
    "image_style": _seeds(
        ["Is this picture made in a <style> style?", "Does the image look like a <medium>?"],
        ["这张图是<某种风格>风格的吗？", "这幅图看起来像<某种媒介>吗？"],
        ["Which visual style best fits this picture?", "What medium does this image most resemble?"],
        ["哪种视觉风格最符合这张图？", "这张图最像哪种媒介的作品？"],
        ["How would you characterise the visual style of this picture?", "What gives this image its look?"],
        ["你如何描述这张图的视觉风格？", "是什么让这张图呈现出这样的观感？"],
    ),
    "image_scene": _seeds(
        ["Was this picture taken <place>?", "Is the scene in the image set <time of day>?"],
        ["这张照片是在<某个地点>拍的吗？", "图中的场景发生在<某个时间>吗？"],
        ["Where was this picture most likely taken?", "What kind of setting does the image show?"],
        ["这张照片最可能在哪里拍摄？", "图中展示的是什么样的场景？"],
        ["Describe the setting shown in the image.", "What can you tell about the place in this picture?"],
        ["描述图中展示的场景。", "关于图中的地点你能看出什么？"],
    ),
    "image_emotion": _seeds(
        ["Does this image convey a feeling of <emotion>?", "Is the mood of the picture <mood>?"],
        ["这张图传达出<某种情绪>的感觉吗？", "这张图的氛围是<某种氛围>吗？"],
        ["What mood does this picture convey?", "Which emotion does the image evoke most strongly?"],
        ["这张图传达出什么氛围？", "这张图最能引起哪种情绪？"],
        ["What feelings does this image evoke, and why?", "How does the picture create its mood?"],
        ["这张图会唤起什么感受？为什么？", "这张图是如何营造出它的氛围的？"],
    ),
    "image_description": _seeds(
        ["Does the image show <object>?", "Is there <number> <object> in the picture?"],
        ["图中有<某个物体>吗？", "图中有<数量>个<某个物体>吗？"],
        ["What is the main subject of this image?", "Which description matches the picture best?"],
        ["这张图的主体是什么？", "哪种描述最符合这张图？"],
        ["Describe this image in detail.", "What is happening in this picture?"],
        ["详细描述这张图片。", "这张图中正在发生什么？"],
    ),
    "object_localization": _seeds(
        ["Is the <object> in the <part> of the image?", "Is the <object> next to the <other object>?"],
        ["<某个物体>在图片的<某个位置>吗？", "<某个物体>在<另一个物体>旁边吗？"],
        ["Where in the image is the <object>?", "Which part of the picture holds the <object>?"],
        ["<某个物体>在图中的什么位置？", "图片的哪个部分有<某个物体>？"],
        ["Where is the <object> located in this image?", "Describe where the objects in the picture are."],
        ["<某个物体>位于图中的哪里？", "描述图中各物体的位置。"],
    ),
    "ocr": _seeds(
        ['Does the text in the image say "<text>"?', "Is the word <word> written in the picture?"],
        ["图中的文字是“<某段文字>”吗？", "图片里写着<某个词>吗？"],
        ["What does the text in the image say?", "Which words appear in the picture?"],
        ["图中的文字写的是什么？", "图片中出现了哪些文字？"],
        ["Read the text shown in the image.", "What is written on the <object>?"],
        ["读出图中显示的文字。", "<某个物体>上写着什么？"],
    ),
    "spatial_relationship": _seeds(
        [
            "Is the <object> above the <other object>?",
            "Is the <object> closer to the camera than the <other object>?",
        ],
        ["<某个物体>在<另一个物体>的上方吗？", "<某个物体>比<另一个物体>离镜头更近吗？"],
        ["Where is the <object> relative to the <other object>?", "What lies to the left of the <object>?"],
        ["<某个物体>相对于<另一个物体>在哪里？", "<某个物体>的左边是什么？"],
        ["How are the <object> and the <other object> arranged?", "Describe the layout of the scene."],
        ["<某个物体>和<另一个物体>是怎样排列的？", "描述场景的布局。"],
    ),
    "species_recognition": _seeds(
        ["Is the animal in the picture a <species>?", "Does the image show a kind of <plant>?"],
        ["图中的动物是<某个物种>吗？", "这张图展示的是一种<某种植物>吗？"],
        ["What species is shown in this picture?", "Which kind of animal or plant is this?"],
        ["图中展示的是什么物种？", "这是哪种动物或植物？"],
        ["What species is this, and how can you tell?", "What do you know about the creature in the image?"],
        ["这是什么物种？你是如何判断的？", "关于图中的生物你知道些什么？"],
    ),
}

BUILTIN_SUFFIXES: dict[str, dict[str, list[str]]] = {
    "longsentence": {
        "English": [" Answer in detail.", " Give a thorough answer.", " Explain your answer fully."],
        "Chinese": ["请详细回答。", "请给出完整的解答。", "请充分解释你的回答。"],
    },
    "shortsentence": {
        "English": [
            " Answer with a word or a short phrase.",
            " Keep the answer brief.",
            " Answer in a few words.",
        ],
        "Chinese": ["请用一个词或短语回答。", "请简短回答。", "请用几个字回答。"],
    },
    "judge": {
        "English": [" Answer yes or no.", " Reply with Yes or No.", " Is that true? Answer Yes or No."],
        "Chinese": ["请回答是或否。", "请用“是”或“否”回答。"],
    },
    "select": {
        "English": [
            " Answer with the option's letter from the given choices directly.",
            " Pick the correct option and give its letter.",
        ],
        "Chinese": ["请直接回答正确选项的字母。", "请选出正确的选项，并给出它的字母。"],
    },
}

_DOMAIN_FILE = re.compile(r"^(?:\d+_)?(?P<domain>.+)\.json$")


@dataclass
class SeedBank:
    """Seed templates per domain (official ``all_seed`` layout) and answer-format suffixes."""

    seeds: dict[str, dict] = field(default_factory=lambda: dict(BUILTIN_SEEDS))
    suffixes: dict[str, dict[str, list[str]]] = field(default_factory=lambda: dict(BUILTIN_SUFFIXES))

    def templates(self, domain: str, type_: str, lang: str) -> list[str]:
        """The seed questions of ``domain`` for an instruction type; [] when it has none (the
        official release has domains with empty seed files)."""
        entry = self.seeds.get(domain) or {}
        return [s for s in (entry.get(SEED_KIND[type_]) or {}).get(LANGS[lang], []) if s.strip()]

    def suffix_list(self, type_: str, lang: str) -> list[str]:
        return list((self.suffixes.get(SUFFIX_KIND[type_]) or {}).get(LANGS[lang], []))


def _check_lists(path: Path, data: object, kinds: tuple[str, ...], what: str) -> dict:
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of {what}")
    for kind, per_lang in data.items():
        if kind not in kinds:
            raise InputError(f"{path}: unknown key {kind!r} (expected {', '.join(kinds)})")
        if not isinstance(per_lang, dict):
            raise InputError(f"{path}: '{kind}' must map languages to lists of strings")
        for lang, items in per_lang.items():
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise InputError(f"{path}: '{kind}.{lang}' must be a list of strings")
    return data


def _read_json(path: Path, empty: object = None) -> object:
    try:
        text = path.read_text(encoding="utf-8")
        if empty is not None and not text.strip():
            return empty
        return json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def load_seeds(path: str | Path) -> dict[str, dict]:
    """Seed files: a directory of ``[NNNNN_]<domain>.json`` (the official ``all_seed`` folder) or one
    such file; the domain is the file name without its number. An empty file (four of the official
    ones are) is a domain without seeds."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise InputError(f"{path}: no seed files (expected <domain>.json or a folder of them)")
    out: dict[str, dict] = {}
    for f in files:
        m = _DOMAIN_FILE.match(f.name)
        if not m:
            raise InputError(f"{f}: seed file names look like 00001_image_style.json")
        out[m.group("domain")] = _check_lists(
            f, _read_json(f, empty={}), tuple(SEED_KIND.values()), "seed lists"
        )
    return out


def load_suffixes(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """An ``end_prompt.json``-style file of answer-format suffixes."""
    path = Path(path)
    return _check_lists(path, _read_json(path), tuple(SUFFIX_KIND.values()), "suffix lists")


def seed_bank(seeds: str | Path | None = None, suffixes: str | Path | None = None) -> SeedBank:
    """The built-in bank, with domains from ``seeds`` replacing or adding to it and suffix kinds from
    ``suffixes`` replacing the built-in ones."""
    bank = SeedBank()
    if seeds is not None:
        bank.seeds.update(load_seeds(seeds))
    if suffixes is not None:
        bank.suffixes.update(load_suffixes(suffixes))
    return bank

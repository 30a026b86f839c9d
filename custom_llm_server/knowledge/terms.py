"""The words search works with: what a text means to the knowledge base, and what a question asks.

- English words are lowercased and stemmed (Snowball, PyStemmer); Chinese is segmented into words
  by jieba (its dictionary ships in its wheel). Stopwords, question words and the small words of
  conversation ("hello", "please", 吗, 怎么) are dropped in both languages: they never decide a match.
- Every word of a question weighs what it tells in general language: wordfreq's frequency of the
  word among English or Chinese text at large, as surprisal. "pytorch" or 权限 says much, "set" or
  设置 little; a Chinese verb, adjective or adverb counts half (jieba's dictionary tags it). This
  weight does not depend on the documents, so it means the same for one FAQ file as for 100,000
  chunks, which is what the relevance decision in index.py needs.
- How a word sounds, for misheard words: a Metaphone code in English (jason/json, sink/sync),
  toneless pinyin in Chinese (全线/权限, 日至/日志).
"""

import itertools
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache, lru_cache

import jellyfish
import jieba
import jieba.posseg
import Stemmer
import wordfreq
from pypinyin import lazy_pinyin

from custom_llm_server.core.text import CJK_RANGES, MAX_QUESTION_CHARS

jieba.setLogLevel(logging.WARNING)  # its "building prefix dict" lines are not ours to log
# jieba keeps its loaded dictionary in one cache file in the temporary folder; one per user, so a cache
# another user left there (root's, in a shared /tmp) is not a permission error and a traceback.
jieba.dt.cache_file = f"jieba-{os.getuid() if hasattr(os, 'getuid') else 0}.cache"
_RUNS = re.compile(f"[{CJK_RANGES}]+|[^\\W_{CJK_RANGES}]+")  # a run of CJK, or a word of letters and digits
_CJK_RUN = re.compile(f"[{CJK_RANGES}]+")
_STEM = Stemmer.Stemmer("english")
MAX_WORDS = 32  # a question's words considered; a hostile 10,000-word question costs no more
MOST_COMMON_ZIPF = 8.0  # wordfreq's Zipf scale: 8 is a word used once every 100 words ("the" is 7.7)
MIN_WEIGHT = 0.5
EVERYDAY_FLOOR = 1e-7  # Zipf 2: once in ten million words

# Grammar, question words and the small words of conversation: they say how something is asked,
# not what it is about. Conversation includes what callers ask a voice agent about itself (your
# name, can you hear me, are you a robot), when, and how they feel: a knowledge base that mentions
# names, robots or happy users is no answer. The last line is what is left of a contraction once
# its apostrophe splits it ("you're" is you + re).
STOPWORDS_EN = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't
    doing don't down during each either else ever every few for from further had hadn't has hasn't
    have haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
    i'd i'll i'm i've if in into is isn't it it's its itself just let's may me might mine more most
    must mustn't my myself neither no nor not now of off often on once only or other ought our ours
    ourselves out over own per please quite rather really same shall shan't she she'd she'll she's
    should shouldn't so some such than that that's the their theirs them themselves then there
    there's these they they'd they'll they're they've this those though through to too under until
    up upon us very via was wasn't we we'd we'll we're we've were weren't what what's whatever when
    when's where where's whether which while who who's whom whose why why's will with won't would
    wouldn't yet you you'd you'll you're you've your yours yourself yourselves also anyone anything
    everything nothing something someone somebody thing things way ways hello hi hey hiya thanks
    thank cheers bye goodbye ok okay yes yeah yep nope um uh hmm oh ah well sure alright tell know
    want wanna gonna like need let say said ask asking question much many lot lots name named called
    talk today tonight later soon hear listen robot bot human ai tomorrow yesterday morning afternoon
    evening night moment mind sorry nice interesting feel feeling feelings funny stupid silly bored
    boring tired happy sad lonely awesome amazing wonderful lovely
    re ll ve don isn aren doesn didn won wasn weren couldn shouldn wouldn haven hasn hadn mustn""".split()  # noqa: SIM905 (a word list reads best as words)
)
STOPWORDS_ZH = frozenset(
    """的 了 吗 呢 吧 啊 呀 哦 嗯 么 着 过 地 得 之 和 与 及 或 或者 而 并 但 但是
    就 都 也 还 又 才 再 是 不 没 没有 有 在 要 会 能 能够 可以 可能 应该 需要 想
    想要 请 请问 麻烦 一下 一个 一些 这 那 这个 那个 这些 那些 这样 那样 这里 那里 哪
    哪个 哪些 哪里 哪儿 什么 怎么 怎么样 怎样 如何 为什么 为何 多少 几 几个 谁 吗 我
    你 您 他 她 它 我们 你们 他们 她们 它们 自己 大家 咱们 把 被 给 让 对 从 向 到
    用 以 为 比 跟 很 太 最 更 非常 真 挺 好 好的 好吧 对的 是的 谢谢 谢谢你 你好
    您好 再见 拜拜 喂 嗨 告诉 知道 问 问题 叫 叫做 名字 名叫 听到 听见 听得见 听得到 说话 聊 聊天 回头
    机器人 真人 人工智能 没关系 不好意思 没事 见 再说 一遍 一点 慢点 说慢 大声 稍等 稍 等 等等 听清 清
    听 说 讲 干得 今天 明天 昨天 早上 上午 下午 晚上 早安 晚安 开心 高兴 难过
    无聊 累 有趣 厉害 笨 快乐 多久 几点 什么时候 一 个 些 下 上 中 里 后 前 时
    时候 干什么 干嘛 怎么办 咋 咋办 咋样 啥 为啥 是否 有没有 能不能 不能 可不可以 要不要 不要
    种 祝 不用 不用了 几号 星期几 周几 几度""".split()  # noqa: SIM905 (a word list reads best as words)
)

# Phrases whose words all go: they ask how ("how long" asks for a duration, it is not about
# length), or they keep a spoken conversation going ("hold on", "can you repeat that?", "speak
# up", "never mind") rather than name a topic.
PHRASES = {
    tuple(phrase.split())
    for phrase in """how long|how often|how far|how old|how soon|what time|what kind|what sort|hold on|wait a
    |one moment|one second|one minute|a moment|a second|a minute|repeat that|repeat it|repeat yourself
    |say that again|say it again|come again|speak up|speak slower|speak louder|speak slowly|talk slower
    |talk louder|didn t catch|never mind|nice to meet|good job|well done|happy birthday|merry christmas
    |happy new year|happy holidays|good luck|take care|no problem|no worries|excuse me|生日 快乐|新年 快乐
    |新春 快乐|春节 快乐|元旦 快乐|圣诞 快乐|节日 快乐|中秋 快乐|中秋节 快乐|国庆 快乐|周末 愉快|恭喜 发财|万事 如意
    |一路 顺风""".split("|")  # noqa: SIM905 (as words)
}
_LONGEST_PHRASE = max(map(len, PHRASES))


# A Chinese question names what it is about with nouns; the verb, adjective or adverb around them
# is often said differently in the documents (解压 where a manual says 提取, 最后 where it says 末尾),
# and a numeral or measure word (一部, 几行) tells little. By jieba's dictionary tag, a word weighs this
# share of its surprisal; a noun, a name and a word jieba does not know (a product, a command) weigh it all.
CHINESE_PART_OF_SPEECH = {"v": 0.5, "a": 0.5, "d": 0.5, "b": 0.5, "f": 0.5, "m": 0.3, "q": 0.3}
_TAGS: dict[str, str] = jieba.posseg.dt.word_tag_tab


@dataclass(frozen=True)
class Word:
    """One word of a question: the term as the index holds it, how much it tells, and the word as
    said (how it sounds: the stem of "message" would sound like "music")."""

    term: str
    weight: float
    chinese: bool
    said: str


def tokens(text: str) -> list[tuple[str, bool]]:
    """A question's words in order, stopwords included, each with whether it is Chinese: cut
    once per question, then read by question_words and heard_apart."""
    found = []
    for run in _RUNS.findall(text[:MAX_QUESTION_CHARS])[: MAX_WORDS * 4]:
        if _CJK_RUN.fullmatch(run):
            found += [(w, True) for word in jieba.lcut(run[: MAX_WORDS * 4]) for w in compound_parts(word) or [word]]
        else:
            found.append((run.lower(), False))
    return found


def _informative(word: str, chinese: bool) -> bool:
    if chinese:
        return word not in STOPWORDS_ZH
    return word not in STOPWORDS_EN and not (len(word) == 1 and word.isalpha())


def _term(word: str, chinese: bool) -> str:
    return word if chinese else stem(word)


def stem(word: str) -> str:
    return _STEM.stemWord(word)


def index_terms(text: str) -> str:
    """A passage's terms, space-separated, as the index stores them. Chinese is cut for search:
    a compound (文本文件) is indexed with the words inside it (文本, 文件), so either finds it."""
    terms = []
    for run in _RUNS.findall(text):
        if _CJK_RUN.fullmatch(run):
            terms += [w for w in jieba.cut_for_search(run) if w not in STOPWORDS_ZH]
        else:
            word = run.lower()
            if word not in STOPWORDS_EN:
                terms.append(stem(word))
    return " ".join(terms)


def question_words(said: list[tuple[str, bool]]) -> list[Word]:
    """The question's informative words (from tokens()), each once, with their weights."""
    words: dict[str, Word] = {}
    for word, chinese in [t for t in _without_phrases(said[: MAX_WORDS * 4]) if _informative(*t)][:MAX_WORDS]:
        term, weight = _term(word, chinese), informativeness(word, "zh" if chinese else "en")
        if chinese:
            weight *= CHINESE_PART_OF_SPEECH.get(_TAGS.get(word, "n")[:1], 1.0)
        if term not in words or words[term].weight < weight:
            words[term] = Word(term, weight, chinese, word)
    return list(words.values())


def asks_something(text: str) -> bool:
    """Whether a question has a word to look up ("hello", "thanks", 你好 do not)."""
    return bool(question_words(tokens(text)))


def _without_phrases(said: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The words, less every occurrence of a phrase in PHRASES."""
    dropped: set[int] = set()
    for start in range(len(said)):
        for size in range(2, _LONGEST_PHRASE + 1):
            if tuple(word for word, _ in said[start : start + size]) in PHRASES:
                dropped.update(range(start, start + size))
    return [token for at, token in enumerate(said) if at not in dropped]


def heard_apart(said: list[tuple[str, bool]]) -> list[tuple[str, str, list[str]]]:
    """Two neighbouring words that may be one word heard or spelt in two ("time out", "named
    tuple", 日 至): the joined term, the joined word, and the question's terms it would stand for. Any two English
    words; in Chinese, a pair with a single character (jieba leaves a misheard word in pieces)."""
    pairs = []
    for (a, a_zh), (b, b_zh) in itertools.pairwise(said[: MAX_WORDS * 2]):
        if a_zh != b_zh or not (a + b).isalpha():
            continue
        if not a_zh or min(len(a), len(b)) == 1:
            stands_for = [_term(w, a_zh) for w in (a, b) if _informative(w, a_zh)]
            if stands_for:
                pairs.append((_term(a + b, a_zh), a + b, stands_for))
    return pairs


@lru_cache(maxsize=65_536)
def informativeness(word: str, lang: str) -> float:
    """How much a word tells, from how rare it is in general language: 8 minus its Zipf frequency
    (a word never seen in wordfreq's corpora, like a product name, tells the most)."""
    return max(MIN_WEIGHT, MOST_COMMON_ZIPF - wordfreq.zipf_frequency(word, lang))


@lru_cache(maxsize=65_536)
def everyday(term: str) -> float:
    """How often everyday language uses a term, on wordfreq's Zipf scale (0: never seen). An English
    stem counts every word that stems to it, as the index does (help: help, helps, helpful…);
    a number or a rarer word, its own frequency (wordfreq reads 2018 as any four digits)."""
    if _CJK_RUN.fullmatch(term):
        return wordfreq.zipf_frequency(term, "zh")
    frequency = _english_stems().get(term)
    return math.log10(frequency) + 9 if frequency else wordfreq.zipf_frequency(term, "en")


@cache
def _english_stems() -> dict[str, float]:
    """Each English stem's everyday frequency, summed over wordfreq's words that stem to it."""
    stems: dict[str, float] = defaultdict(float)
    for _, term, frequency in _english_words():
        stems[term] += frequency
    return dict(stems)


def said_as(term: str) -> str:
    """The word an index term is said as: an English stem's (see _said_as), else the term itself."""
    return _said_as().get(term, term)


@cache
def _said_as() -> dict[str, str]:
    """How each English stem is said: its most common word (messag: message; chang: change, not
    the name Chang), or the stem itself when that is a word a tenth as common (commit, not committed)."""
    said: dict[str, tuple[str, float]] = {}
    for word, term, frequency in _english_words():
        if term not in said or frequency > said[term][1]:
            said[term] = (word, frequency)
    for word, term, frequency in _english_words():
        if word == term and frequency * 10 >= said[term][1]:
            said[term] = (word, frequency)
    return {term: word for term, (word, _) in said.items()}


@cache
def _english_words() -> list[tuple[str, str, float]]:
    """wordfreq's English words from EVERYDAY_FLOOR up: (word, its stem, its frequency). Rarer
    words are left out (0.2 s and 63,000 stems instead of 0.5 s and 228,000): any knowledge base
    that uses one uses it far more than everyday language does."""
    frequencies = wordfreq.get_frequency_dict("en")
    words = [word for word, frequency in frequencies.items() if frequency >= EVERYDAY_FLOOR]
    return list(zip(words, _STEM.stemWords(words), [frequencies[word] for word in words], strict=True))


@lru_cache(maxsize=65_536)
def sound(word: str) -> str:
    """How a word as said sounds (an index term's word: said_as): toneless pinyin for Chinese,
    Metaphone for English, where a first vowel is any vowel (speech recognition hears
    "environment" as "in vironment")."""
    if _CJK_RUN.fullmatch(word):
        return "".join(lazy_pinyin(word))
    code = jellyfish.metaphone(word)
    code = "A" + code[1:] if code[:1] in ("A", "E", "I", "O", "U") else code
    return code if len(code) >= 3 else word  # two consonants sound like too many words


def compound_parts(word: str) -> list[str]:
    """The dictionary words inside a Chinese compound (磁盘空间 → 磁盘, 空间): a question asks for
    them, and a passage may say them apart or together (the index holds both)."""
    if len(word) <= 2 or word in STOPWORDS_ZH:  # 不好意思 is one way of saying sorry, not 不好 and 意思
        return []
    parts = {w for w in jieba.cut_for_search(word) if w != word and len(w) > 1}
    cover, at = [], 0
    while at < len(word):  # left to right, the longest part that starts here
        part = max((p for p in parts if word.startswith(p, at)), key=len, default=None)
        if part is None:
            return []  # 机器人 is not 机器 plus something: keep it whole
        cover.append(part)
        at += len(part)
    return cover


def warm_up() -> None:
    """Load jieba's and wordfreq's dictionaries now rather than in the first question."""
    question_words(tokens("warm up the dictionaries 加载词典"))
    _english_stems()
    _said_as()
    sound("词典")

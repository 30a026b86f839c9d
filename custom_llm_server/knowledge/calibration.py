"""The relevance threshold of a knowledge base: how close its passages come to questions it cannot
answer, plus a margin.

Why not one number for every knowledge base: the built-in model's cosine similarities sit at a level
of their own in each one. The more passages there are, and the more everyday their words, the closer
the nearest of them comes to any question at all, so a threshold that keeps near misses out of a large
manual turns away answers a help centre has, and one made for the help centre lets the manual's near
misses in. So each knowledge base is asked PROBES, questions about everything any knowledge base here
is unlikely to be for (history, cooking, sport, animals, in English and in Chinese); the median
similarity of their nearest passages, in the language that comes nearer, is its background, and a
passage answers on meaning alone when it is MARGIN closer to the question than that. The median holds
when a few probes do touch the knowledge base's topic (a cookery FAQ answers the soup question). The
numbers behind these choices are measured by bench/retrieval.py, in docs/benchmarks.md.
"""

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from custom_llm_server.knowledge.embeddings import Embedder

# A passage answers on meaning alone this much above the knowledge base's background (chosen on the
# benchmark's manuals and help centre: the most recall with at most one in ten unanswerable questions
# getting a passage; chosen on either corpus alone, a margin carries to the other better than a single
# threshold does).
MARGIN = 0.04
# Bounds on the threshold, whatever the background. Below FLOOR the built-in model's similarity is no
# evidence on its own even in a tiny FAQ, whose background is low because it has few passages: a
# question to the agent ("你喜欢吃什么？", what do you like to eat?) reaches 0.868 on a bakery's eight
# answers. CEILING keeps a knowledge base that many probes touch answerable.
FLOOR, CEILING = 0.87, 0.90

PROBES = {
    "en": (
        "who painted the Mona Lisa?",
        "how far is the moon from the earth?",
        "what is the tallest mountain in Africa?",
        "when did the Roman Empire fall?",
        "how many players are on a basketball team?",
        "what should I plant in my garden in spring?",
        "how do I train my puppy to sit?",
        "what's a good recipe for chicken soup?",
        "how long should I boil an egg?",
        "which planet has the most moons?",
        "how do I get rid of a headache?",
        "what is the exchange rate for the yen?",
        "who wrote Pride and Prejudice?",
        "how do I tie a tie?",
        "what causes earthquakes?",
        "how many bones are in the human body?",
        "what time does the sun set in winter?",
        "how do I learn to play the guitar?",
        "what's the best beach in Thailand?",
        "how do vaccines work?",
        "why is the sky blue?",
        "how do I change a flat tyre?",
        "what language do they speak in Brazil?",
        "how do I make my houseplants grow faster?",
    ),
    "zh": (
        "长城有多长？",
        "熊猫吃什么？",
        "怎么做红烧鱼？",
        "世界上最大的海洋是哪个？",
        "李白是哪个朝代的诗人？",
        "怎么学游泳？",
        "感冒发烧吃什么好？",
        "去西藏旅游要准备什么？",
        "足球比赛一场多长时间？",
        "怎么养多肉植物？",
        "地球绕太阳转一圈要多久？",
        "北京有哪些好玩的地方？",
        "怎么提高睡眠质量？",
        "钢琴初学者应该怎么练？",
        "为什么会下雪？",
        "怎么挑选新鲜的水果？",
        "恐龙是怎么灭绝的？",
        "油价最近涨了吗？",
        "马拉松全程多少公里？",
        "怎么给狗洗澡？",
    ),
}


async def embedded(embedder: "Embedder") -> dict[str, np.ndarray]:
    """The probes as the model embeds questions, a matrix per language."""
    return {language: np.stack([await embedder.query(q) for q in asked]) for language, asked in PROBES.items()}


def nearest(vectors: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """For each probe, the similarity of the passage nearest it (unit vectors, a row each)."""
    found = np.full(len(probes), -1.0, dtype=np.float32)
    for start in range(0, len(vectors), 16_384):  # a block at a time: 100,000 passages x 44 probes at once is 18 MB
        np.maximum(found, (vectors[start : start + 16_384] @ probes.T).max(axis=0), out=found)
    return found


def background(vectors: np.ndarray, probes: dict[str, np.ndarray]) -> float:
    """How near the knowledge base comes to questions it cannot answer: the median of nearest(), in
    the language whose probes it comes nearer. A knowledge base in one language is far from every
    question in another (English manuals are much nearer the English probes than the Chinese ones),
    which says nothing of the questions it will be asked."""
    found = nearest(vectors, np.concatenate(list(probes.values())))  # one pass over the vectors for all
    ends = np.cumsum([len(asked) for asked in probes.values()])
    return max(float(np.median(part)) for part in np.split(found, ends[:-1]))


def threshold(vectors: np.ndarray, probes: dict[str, np.ndarray]) -> float:
    """The similarity at which a passage of this knowledge base answers on meaning alone."""
    return float(np.clip(background(vectors, probes) + MARGIN, FLOOR, CEILING))

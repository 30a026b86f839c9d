"""The near miss: what a passage that reaches the threshold by a hair needs besides its similarity.

In a small knowledge base (an FAQ, a short manual) the threshold is calibration.FLOOR, and a question on
a neighbouring topic (a static IP address, a graphics driver, a firewall asked of a shop's FAQ) comes
just over it, 0.877 to 0.887 on a floor of 0.870, to the passage nearest its everyday words. What it
lacks is what an answer has: the answer stands out from the rest of the knowledge base (the next
passage in its language is clearly farther), or it holds the question's words or what a repair of
them brought in. So within NEAR of the threshold a passage answers only with one of them.

A large knowledge base (STANDOUT_UNTIL passages and more, index.py) is left as it is: there many
passages are about equally close to any question (a help centre's page and its neighbours), so
standing out says little, and its threshold, calibrated on its own background, sits higher already.
"""

import numpy as np

# The band over the threshold where similarity alone is not enough.
NEAR = 0.02
# Standing out: the best passage this much nearer than the next one in its language (half of
# index.py's STANDOUT, which lets a passage in from below the threshold).
APART = 0.0125


def near_misses(
    similarity: np.ndarray, threshold: float, supported: np.ndarray, chinese: np.ndarray, until: int
) -> np.ndarray:
    """The passages to leave out (True): within NEAR over the threshold, without the words' support,
    when the best passage does not stand out from the next in its language. supported: the lexical
    decision (or a repair's words) per passage; chinese: each passage's language (language.py)."""
    none = np.zeros(similarity.shape, dtype=bool)
    if similarity.size == 0 or similarity.size >= until:
        return none
    band = (similarity >= threshold) & (similarity < threshold + NEAR) & ~supported
    if not band.any():
        return none
    best = int(np.argmax(similarity))
    if similarity[best] >= threshold + NEAR:  # an answer clearly over the threshold: the question is ours
        return none
    rest = similarity[(chinese == chinese[best]) & (similarity < similarity[best] - 1e-6)]  # copies share a vector
    if rest.size and similarity[best] - float(rest.max()) >= APART:
        return none
    return band

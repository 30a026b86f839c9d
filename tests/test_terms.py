"""terms.py: the words a question asks and a passage holds, their weights and how they sound."""

import pytest
import wordfreq

from custom_llm_server.knowledge.terms import (
    everyday,
    heard_apart,
    index_terms,
    informativeness,
    question_words,
    said_as,
    sound,
    tokens,
)


def asked(question: str) -> dict[str, float]:
    return {word.term: word.weight for word in question_words(tokens(question))}


@pytest.mark.parametrize(
    ("question", "terms"),
    [
        ("Hello! How long does delivery take, please?", {"deliveri", "take"}),  # "how long" asks, "long" is no topic
        ("what's your name?", set()),
        ("can you hear me?", set()),
        ("are you a robot or a real human?", {"real"}),
        ("你是机器人吗？", set()),
        ("you're funny, talk to you tomorrow", set()),  # "you're" leaves no "re" behind
        ("不好意思，明天见", set()),
        ("sorry, can you repeat that? I didn't catch it", set()),  # keeping the conversation going
        ("hold on a second", set()),
        ("请再说一遍，我没听清", set()),
        ("can I add a second user?", {"add", "user"}),
        ("你好，请问怎么修改文件的权限？", {"修改", "文件", "权限"}),
        ("谢谢你", set()),
        ("PATH变量是干什么用的？", {"path", "变量"}),  # 干什么 asks "what for"
        ("缺少依赖怎么办？", {"缺少", "依赖"}),
        ("祝你生日快乐！", set()),  # a greeting, like "happy birthday"
        ("生日蛋糕要提前几天订？", {"生日", "蛋糕", "提前", "几天", "订"}),
    ],
)
def test_only_words_that_carry_meaning_are_asked(question, terms):
    assert set(asked(question)) == terms


def test_rare_words_weigh_more_than_everyday_ones_in_both_languages():
    english, chinese = asked("how do I set the pytorch timeout"), asked("怎么设置权限")
    assert english["pytorch"] > english["timeout"] > english["set"]
    assert chinese["权限"] > chinese["设置"]


def test_a_chinese_verb_or_adverb_counts_half_a_noun_all():
    weights = asked("怎么正确解压归档文件")
    assert weights["解压"] == pytest.approx(informativeness("解压", "zh") / 2)  # a verb
    assert weights["正确"] == pytest.approx(informativeness("正确", "zh") / 2)  # an adverb
    assert weights["文件"] == pytest.approx(informativeness("文件", "zh"))  # a noun
    assert asked("怎么用docker部署")["docker"] == pytest.approx(informativeness("docker", "en"))


def test_a_compound_is_asked_and_indexed_as_its_parts_too():
    assert set(asked("怎么查看磁盘空间")) >= {"磁盘", "空间"}
    assert {"磁盘", "空间"} <= set(index_terms("显示磁盘空间的使用情况").split())


def test_words_heard_apart_are_offered_joined():
    assert ("timeout", "timeout", ["time"]) in heard_apart(tokens("set a time out"))
    assert ("namedtupl", "namedtuple", ["tupl"]) in heard_apart(
        tokens("a named tuple")
    )  # "named" alone asks for nothing
    assert ("日至", "日至", ["日", "至"]) in heard_apart([("日", True), ("至", True)])  # then heard as 日志 by sound


def test_words_that_sound_alike_share_a_sound():
    assert sound("jason") == sound("json") and sound("sink") == sound("sync")
    assert sound("全线") == sound("权限") and sound("内村") == sound("内存")
    assert sound("日至") == sound("日志")
    assert sound("invironment") == sound("environment")  # a first vowel is any vowel
    assert sound("pip") == "pip"  # a two-letter code (PP) would sound like too many words: it stands for itself


def test_an_index_term_sounds_like_the_word_it_is_said_as():
    # The index holds stems: messag, said as message, does not sound like music, though its letters would
    assert said_as("messag") == "message" and sound(said_as("messag")) != sound("music")
    assert said_as("chang") == "change"  # not the surname Chang, a rarer word with the same letters
    assert said_as("commit") == "commit"  # a word of its own, though "committed" is more common
    assert said_as("json") == "json" and said_as("日志") == "日志"


def test_everyday_frequency_of_a_stem_counts_each_word_that_stems_to_it():
    assert everyday("help") > wordfreq.zipf_frequency("help", "en")  # help, helps, helped, helpful…
    assert everyday("favorit") >= wordfreq.zipf_frequency("favorite", "en") > 0  # a stem, not a word
    assert everyday("2018") == wordfreq.zipf_frequency("2018", "en") > 0  # a number is no rare word
    assert everyday("配置") == wordfreq.zipf_frequency("配置", "zh")
    assert everyday("qxzvw") == 0

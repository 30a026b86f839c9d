"""Spoken questions: the question as meant (spoken.py) against the knowledge base's own vocabulary,
searched by meaning beside the question as said; the language of the passages; questions embedded once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from custom_llm_server.knowledge.embeddings import BuiltinModel
from custom_llm_server.knowledge.index import Knowledge, KnowledgeBase
from tests.conftest import AUTH

SERVER_DOCS = """# Serving files

## Serving the current folder over HTTP
Run python3 -m http.server in the folder: it serves its files over HTTP on port 8000.

## Comparing files side by side
Use sdiff to merge two files interactively; diff3 compares three files from a common ancestor.

## Packages
A .deb package installs with dpkg -i; remove it again with dpkg -r. Keep a backup of the configuration.

## Certificates
Every request over HTTPS checks the server's certificate against the CA bundle.
"""
SCHEDULING = """# 定时任务

## 设置定时任务
用 crontab -e 编辑定时任务：每一行是一个任务，写明分钟、小时、日期和要运行的命令。

## 查看定时任务
crontab -l 列出当前用户的全部任务。

## 删除定时任务
crontab -r 删除当前用户的全部任务。

## 一次性任务
at 命令在指定时间运行一次任务。

## 任务的输出
定时任务的输出会以邮件发给用户。
"""
NOVEL = "# 小说\n\n## 作者\n书中的人物都是虚构的。\n"


@pytest.fixture
def kb(tmp_path) -> KnowledgeBase:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "serving.md").write_text(SERVER_DOCS)
    (tmp_path / "docs" / "cron.md").write_text(SCHEDULING)
    (tmp_path / "docs" / "novel.md").write_text(NOVEL)
    base = KnowledgeBase(tmp_path / "docs", tmp_path / "index.sqlite3")
    base.index()
    return base


def meant(kb: KnowledgeBase, question: str) -> str | None:
    found = kb.meant(question)
    return found.text if found else None


def test_letters_spelled_out_are_the_word_they_spell(kb):
    assert meant(kb, "how do I serve the current folder over h t t p") == (
        "how do i serve the current folder over http"
    )
    assert meant(kb, "s s h 怎么指定端口") == "ssh 怎么指定端口"  # spelled in a Chinese question too
    assert meant(kb, "is there a m d 5 sum") == "is there a md5 sum"  # a digit after the letters is theirs
    # "a" and "i" beside spelled letters are the article and the pronoun
    assert meant(kb, "can i use a p d f") == "can i use a pdf"


def test_a_letter_or_a_digit_joins_a_word_only_as_a_word_the_knowledge_base_has(kb):
    assert meant(kb, "how do I merge two files with s diff") == "how do i merge two files with sdiff"
    assert meant(kb, "what does diff three do") == "what does diff3 do"
    assert meant(kb, "what is room three two") is None  # "three two" stays words: no such term
    assert meant(kb, "set a time out") is None  # "a time" is no "atime", whatever the index holds


def test_a_word_heard_in_two_is_the_word_the_knowledge_base_has(kb):
    assert meant(kb, "do I need a back up of the configuration") == "do i need a backup of the configuration"


def test_a_known_word_is_heard_as_a_homophone_only_where_the_knowledge_base_is_about_the_homophone(kb):
    # 人物 is in the index once, in passing; 任务, said the same (renwu), in every section: the caller meant 任务
    assert meant(kb, "怎么设置定时人物") == "怎么设置定时任务"
    assert meant(kb, "怎么查看定时任务") is None  # said as meant: nothing to repair
    assert meant(kb, "小说里的人物是真的吗") is None  # 人物 beside the words it goes with: as heard


def test_an_apostrophe_is_no_spelled_letter(kb):
    assert meant(kb, "what's the server's certificate") is None  # "s" after an apostrophe is no letter


def test_a_question_with_nothing_to_repair_is_searched_once(kb):
    assert meant(kb, "how do I remove a package") is None
    assert meant(kb, "hello") is None


def test_the_words_of_the_question_as_meant_support_it_without_vectors(kb):
    """By words alone, spelled letters joined are a word the passage holds."""
    knowledge = Knowledge(kb)
    found = asyncio.run(knowledge.search("what serves files over h t t p", 3))
    assert found and found[0].heading.endswith("Serving the current folder over HTTP")


@pytest.fixture(scope="module")
def model() -> BuiltinModel:
    return BuiltinModel(threads=1)


def searched(tmp_path: Path, model: BuiltinModel, files: dict[str, str]) -> Knowledge:
    """A knowledge base of these files, embedded and calibrated with the built-in model."""
    (tmp_path / "docs").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / "docs" / name).write_text(text)
    knowledge = Knowledge(KnowledgeBase(tmp_path / "docs", tmp_path / "vectors.sqlite3"), model)

    async def start() -> None:
        await knowledge.start()
        assert knowledge.embedding is not None
        await knowledge.embedding

    asyncio.run(start())
    return knowledge


def test_search_by_meaning_sees_the_question_as_meant(tmp_path, model):
    knowledge = searched(tmp_path, model, {"serving.md": SERVER_DOCS, "cron.md": SCHEDULING})
    found = asyncio.run(knowledge.search("how do I serve the current folder over h t t p", 3))
    assert found[0].heading.endswith("Serving the current folder over HTTP")
    found = asyncio.run(knowledge.search("怎么设置定时人物", 3))
    assert found and found[0].heading.endswith("设置定时任务")
    assert asyncio.run(knowledge.search("what's the weather like in paris tomorrow?", 3)) == []


BILINGUAL = {
    "en.md": "# Help\n\n## Printing in black and white\nChoose Print, then Options, and tick Black & white.\n\n"
    "## Page numbers\nInsert a Page Number field in the footer.\n",
    "zh.md": "# 帮助\n\n## 黑白打印\n选择“打印”，然后选择“选项”，勾选“黑白”。\n\n## 页码\n在页脚中插入页码字段。\n",
}


def test_the_passage_in_the_questions_language_comes_first(tmp_path, model):
    """A page and its translation are about equally close: the caller hears the one in their language."""
    knowledge = searched(tmp_path, model, BILINGUAL)
    english = asyncio.run(knowledge.search("how do I print in black and white?", 2))
    assert english[0].source == "en.md"
    chinese = asyncio.run(knowledge.search("怎么打印成黑白的", 2))
    assert chinese[0].source == "zh.md"


def test_a_question_asked_again_is_not_embedded_again(make_server, upstream_server, upstream, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "serving.md").write_text(SERVER_DOCS)
    server = make_server(
        knowledge_dir=tmp_path / "docs",
        knowledge_index=str(tmp_path / "hosted.sqlite3"),
        embedding_base_url=f"{upstream_server.url}/v1",
        embedding_model="scripted-embed",
        rag_min_similarity=0.3,
    )
    retriever = server.server.config.app.state.agents.get("default").retriever
    while retriever.embedding is None or not retriever.embedding.done():
        asyncio.run(asyncio.sleep(0.05))

    def ask(question: str) -> None:
        httpx.get(server.url + "/knowledge/search", params={"q": question}, headers=AUTH, timeout=30).raise_for_status()

    ask("how do I remove a package?")
    ask("how do I remove a package?")
    ask("how do I serve files over h t t p")  # the question and its repaired reading, in one request
    asked = [batch for batch in upstream.embedding_requests if "how do I" in batch[0]]
    assert asked == [
        ["how do I remove a package?"],
        ["how do I serve files over h t t p", "how do i serve files over http"],
    ]

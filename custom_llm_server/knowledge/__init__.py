"""The knowledge base: documents, words, ranking, meaning, calibration, the index and /rag around any retriever."""

"""Long-term memory: embeddings (embedder), the vector store (store), fact extraction (extract),
and the service that ties them to chat and the API (service). See docs/memory.md."""

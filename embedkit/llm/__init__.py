"""The generative head of an LLM embedder: SFT, DPO and joint (GritLM-style) training, chat generation.

One model folder serves both sides: `embedkit.models.load_model(dir)` (embeddings) and
`embedkit.llm.generate.load_generator(dir)` (answers).
"""

"""One place for every default that more than one file needs.

Sampling defaults differ by front end, as in the original: the Python `chat()` keeps sat's chat
defaults; the CLI, web demo and API use the demos' settings.
"""

# Sampling (see model/sampling.py for what each value does).
CHAT_SAMPLING = dict(max_length=1024, top_p=0.7, top_k=30, temperature=0.95, repetition_penalty=1.2)
DEMO_SAMPLING = dict(max_length=2048, top_p=0.4, top_k=100, temperature=0.8, repetition_penalty=1.2)

# Images: reading from files and URLs (CLI, Python, training data) ...
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000            # far above any photo; stops decompression bombs
# ... and from clients of a server, which get a tighter budget.
SERVER_MAX_IMAGE_BYTES = 20 * 1024 * 1024
SERVER_MAX_IMAGE_PIXELS = 50_000_000

# The ChatGLM tokenizer's files, as published in THUDM/chatglm-6b and THUDM/visualglm-6b.
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")

# Encoded images kept per engine (a client re-sends its image with every turn).
IMAGE_CACHE_SIZE = 16

# Decoding paths (model/backend.py): auto = the fast path on a GPU, sat otherwise; sat = the reference.
BACKENDS = ("auto", "fast", "sat")
BACKEND_HELP = "decoding path: auto (fast on a GPU), fast, or sat (the reference path)"

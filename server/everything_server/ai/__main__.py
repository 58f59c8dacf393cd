"""`python -m everything_server.ai` runs the mock model server (same as `python -m everything_server.ai.mock`)."""

from everything_server.ai.mock import main

main()

"""Files in and out: character cards (V1/V2/V3, JSON or PNG) and conversation exports (ours, and
ChatGPT's). Pure functions from bytes to schemas and back; the routes only call them."""

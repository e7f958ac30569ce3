"""The daemon's site: every route, the one policy (token, CORS, JSON errors, limits), and what is behind each."""

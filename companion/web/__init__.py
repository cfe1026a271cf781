"""The chat web page: static HTML, CSS and JavaScript served at `/`, and the cookie session it
signs in with (`/web/session`, `/web/signout`). The page talks to the same `/v1` API as any client."""

"""The fhe-bento protocol, shared by the client and the server: batch and envelope framing (`wire`),
header and attribute names, part size and demo tags (`names`), error codes and their statuses (`errors`).
It imports nothing of the server or the client."""

"""Client threads for the serving tests."""

import threading


def in_threads(fn, n):
    """Runs `fn(k)` for k = 0 .. n-1 in n threads at once; returns (results, errors), one entry per k
    (an exception raised in a thread, an assertion among them, is kept for the test to see)."""
    results, errors = [None] * n, [None] * n

    def client(k):
        try:
            results[k] = fn(k)
        except Exception as error:
            errors[k] = error

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors

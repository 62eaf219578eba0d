/* The compiled swarm engine for the reference protocol (docs/protocol.md) over ws://.
 *
 * What chatprobe/swarm/engine.py's WorkerEngine does for any adapter, this does for the
 * reference protocol alone, in C, in a thread of its own that never takes the interpreter
 * lock: it holds every customer's and probe agent's WebSocket on one epoll, sends each
 * stamped message at its planned time, checks every received stamp, answers as the script
 * says, and writes the same flat records WorkerEngine writes. Python hands rounds in and takes
 * records out (chatprobe/swarm/fastref.py); the ledger, the verdicts and Locust stay Python.
 * Why: a stamped, confirmed message takes at least three frames (send, ack, push), and the
 * Python engine's ~40 µs per frame could not beat a hand-written locustfile's round trip
 * (benchmarks/bench_floor.py measures both).
 *
 * Thread model: the loop thread owns all connection state. The lock guards only the
 * hand-over queue (rounds in) and the output buffers (records, events, counters out).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "blake2b.h"

/* ---- growable byte buffers ---- */

#define KEEP_BUFFER (256u << 10)  /* a connection's buffer above this is freed once empty */

typedef struct { char *p; size_t n, cap; } buf;

static void buf_need(buf *b, size_t more) {
  if (b->n + more > b->cap) {
    size_t cap = (b->n + more) * 2 + 256;
    char *p = realloc(b->p, cap);
    if (p == NULL) abort();  /* out of memory: nothing sensible is left to do */
    b->p = p; b->cap = cap;
  }
}
static void buf_put(buf *b, const void *s, size_t n) {
  if (n == 0) return;  /* an empty buffer's pointer may be NULL: no memcpy from it */
  buf_need(b, n); memcpy(b->p + b->n, s, n); b->n += n;
}
static void buf_str(buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_int(buf *b, long long v) { char t[24]; buf_put(b, t, (size_t)snprintf(t, 24, "%lld", v)); }
static void buf_free(buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }

/* A JSON string, quoted; UTF-8 passes through (the service reads UTF-8 JSON). */
static void buf_json(buf *b, const char *s, size_t n) {
  buf_need(b, n + 2);
  b->p[b->n++] = '"';
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\') { buf_need(b, 2); b->p[b->n++] = '\\'; b->p[b->n++] = (char)ch; }
    else if (ch < 0x20) { char e[8]; snprintf(e, 8, "\\u%04x", ch); buf_put(b, e, 6); }
    else { buf_need(b, 1); b->p[b->n++] = (char)ch; }
  }
  buf_need(b, 1);
  b->p[b->n++] = '"';
}

static char *dup_n(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d == NULL) abort();
  memcpy(d, s, n); d[n] = 0;
  return d;
}

/* ---- JSON: the flat objects of the reference protocol ---- */

typedef struct { const char *k; size_t kn; const char *v; size_t vn; char what; } field;
enum { J_STR = 's', J_NUM = 'n', J_OTHER = 'o' };

static const char *skip_ws(const char *p, const char *e) {
  while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}
static const char *skip_str(const char *p, const char *e) {  /* p after the opening quote */
  while (p < e) {
    if (*p == '\\') p += 2;
    else if (*p == '"') return p + 1;
    else p++;
  }
  return NULL;
}
/* The top-level fields of one JSON object (string values still escaped); -1 if it is not one.
 * Nested values are skipped whole. */
static int scan_object(const char *p, const char *e, field *out, int max) {
  int n = 0;
  p = skip_ws(p, e);
  if (p >= e || *p != '{') return -1;
  p++;
  for (;;) {
    p = skip_ws(p, e);
    if (p < e && *p == '}') return n;
    if (p >= e || *p != '"') return -1;
    const char *k = p + 1;
    if ((p = skip_str(k, e)) == NULL) return -1;
    size_t kn = (size_t)(p - 1 - k);
    p = skip_ws(p, e);
    if (p >= e || *p != ':') return -1;
    p = skip_ws(p + 1, e);
    if (p >= e) return -1;
    const char *v = p; size_t vn; char what;
    if (*p == '"') {
      v = p + 1;
      if ((p = skip_str(v, e)) == NULL) return -1;
      vn = (size_t)(p - 1 - v); what = J_STR;
    } else if (*p == '{' || *p == '[') {
      int depth = 0;
      while (p < e) {
        if (*p == '"') { if ((p = skip_str(p + 1, e)) == NULL) return -1; continue; }
        if (*p == '{' || *p == '[') depth++;
        else if ((*p == '}' || *p == ']') && --depth == 0) { p++; break; }
        p++;
      }
      if (depth != 0) return -1;
      vn = (size_t)(p - v); what = J_OTHER;
    } else {
      while (p < e && *p != ',' && *p != '}' && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') p++;
      vn = (size_t)(p - v);
      what = (vn > 0 && (*v == '-' || (*v >= '0' && *v <= '9'))) ? J_NUM : J_OTHER;
    }
    if (n < max) { out[n] = (field){k, kn, v, vn, what}; n++; }
    p = skip_ws(p, e);
    if (p < e && *p == ',') { p++; continue; }
    if (p < e && *p == '}') return n;
    return -1;
  }
}
static const field *get(const field *f, int n, const char *key, size_t kl) {
  for (int i = 0; i < n; i++)
    if (f[i].kn == kl && memcmp(f[i].k, key, kl) == 0) return &f[i];
  return NULL;
}
#define GET(f, n, key) get(f, n, key, sizeof(key) - 1)
static int is(const field *f, const char *s) { return f && f->what == J_STR && f->vn == strlen(s) && memcmp(f->v, s, f->vn) == 0; }

/* An integer value (the protocol's ids): 1 and *out on success. */
static int int_of(const field *f, int64_t *out) {
  if (f == NULL || f->what != J_NUM || f->vn == 0 || f->vn > 19) return 0;
  if (f->vn == 19 && f->v[0] != '-') return 0;  /* 19 digits may not fit: ids never need them */
  int64_t v = 0; size_t i = 0; int neg = 0;
  if (f->v[0] == '-') { neg = 1; i = 1; }
  if (i == f->vn) return 0;
  for (; i < f->vn; i++) {
    if (f->v[i] < '0' || f->v[i] > '9') return 0;
    v = v * 10 + (f->v[i] - '0');
  }
  *out = neg ? -v : v;
  return 1;
}

static int hexval(char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
       : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}
static int hex4(const char *s, unsigned *cp) {
  unsigned v = 0;
  for (int j = 0; j < 4; j++) { int h = hexval(s[j]); if (h < 0) return 0; v = v * 16 + (unsigned)h; }
  *cp = v; return 1;
}
static size_t put_utf8(char *o, unsigned cp) {
  if (cp < 0x80) { o[0] = (char)cp; return 1; }
  if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 63)); return 2; }
  if (cp < 0x10000) { o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 63));
    o[2] = (char)(0x80 | (cp & 63)); return 3; }
  o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 63));
  o[2] = (char)(0x80 | ((cp >> 6) & 63)); o[3] = (char)(0x80 | (cp & 63)); return 4;
}
/* A JSON string's value, unescaped into out (as long as the escaped text at most);
 * -1 for a bad escape. A lone surrogate becomes U+FFFD, as a text that cannot be UTF-8. */
static long unescape(const char *s, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] != '\\') { out[o++] = s[i]; continue; }
    if (++i >= n) return -1;
    switch (s[i]) {
      case '"': out[o++] = '"'; break;
      case '\\': out[o++] = '\\'; break;
      case '/': out[o++] = '/'; break;
      case 'b': out[o++] = '\b'; break;
      case 'f': out[o++] = '\f'; break;
      case 'n': out[o++] = '\n'; break;
      case 'r': out[o++] = '\r'; break;
      case 't': out[o++] = '\t'; break;
      case 'u': {
        unsigned cp;
        if (i + 4 >= n || !hex4(s + i + 1, &cp)) return -1;
        i += 4;
        if (cp >= 0xD800 && cp < 0xDC00) {
          unsigned lo;
          if (i + 6 < n && s[i + 1] == '\\' && s[i + 2] == 'u' && hex4(s + i + 3, &lo)
              && lo >= 0xDC00 && lo < 0xE000) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            i += 6;
          } else cp = 0xFFFD;
        } else if (cp >= 0xDC00 && cp < 0xE000) cp = 0xFFFD;
        o += put_utf8(out + o, cp);
        break;
      }
      default: return -1;
    }
  }
  return (long)o;
}

/* ---- clocks ---- */

static int64_t mono_us(void) {  /* the clock of chatprobe.swarm.engine.now_us */
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- a set / map of 64-bit keys (open addressing; keys are hashes or ids) ---- */

typedef struct { uint64_t *keys; void **vals; size_t cap, n; } u64map;  /* key 0 = empty */

static uint64_t mix64(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return x;
}
static uint64_t hash_bytes(const char *s, size_t n, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ULL ^ seed;
  for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 0x100000001b3ULL; }
  h = mix64(h);
  return h ? h : 1;
}
static void map_grow(u64map *m);
static void **map_slot(u64map *m, uint64_t key, int create) {
  if (create && (m->n + 1) * 4 > m->cap * 3) map_grow(m);
  if (m->cap == 0) return NULL;
  size_t mask = m->cap - 1, i = mix64(key) & mask;
  for (;;) {
    if (m->keys[i] == key) return &m->vals[i];
    if (m->keys[i] == 0) {
      if (!create) return NULL;
      m->keys[i] = key; m->vals[i] = NULL; m->n++;
      return &m->vals[i];
    }
    i = (i + 1) & mask;
  }
}
static void map_grow(u64map *m) {
  u64map old = *m;
  m->cap = old.cap ? old.cap * 2 : 64;
  m->keys = calloc(m->cap, sizeof(uint64_t));
  m->vals = calloc(m->cap, sizeof(void *));
  if (m->keys == NULL || m->vals == NULL) abort();
  m->n = 0;
  for (size_t i = 0; i < old.cap; i++)
    if (old.keys[i]) *map_slot(m, old.keys[i], 1) = old.vals[i];
  free(old.keys); free(old.vals);
}
static void *map_get(u64map *m, uint64_t key) { void **s = map_slot(m, key, 0); return s ? *s : NULL; }
static void map_del(u64map *m, uint64_t key) {  /* backward-shift deletion: no tombstones */
  if (m->cap == 0) return;
  size_t mask = m->cap - 1, i = mix64(key) & mask;
  while (m->keys[i] != key) { if (m->keys[i] == 0) return; i = (i + 1) & mask; }
  m->n--;
  for (size_t j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
    size_t home = mix64(m->keys[j]) & mask;
    /* move j into the hole at i unless its home lies cyclically in (i, j] */
    if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
      m->keys[i] = m->keys[j]; m->vals[i] = m->vals[j]; i = j;
    }
  }
  m->keys[i] = 0; m->vals[i] = NULL;
}

/* A bounded memory of keys seen (chatprobe.protocols.link.SeenIds): the oldest go first.
 * Its ring grows as keys come, so that an idle connection holds next to nothing. */
#define SEEN_LIMIT 200000
typedef struct { u64map set; uint64_t *ring; size_t limit, cap, oldest, count; } seen_keys;
static int seen_first_time(seen_keys *s, uint64_t key) {
  if (map_slot(&s->set, key, 0)) return 0;
  if (s->count == s->limit) {  /* full: the oldest makes room */
    map_del(&s->set, s->ring[s->oldest]);
    s->ring[s->oldest] = key;
    s->oldest = (s->oldest + 1) % s->cap;
  } else {
    if (s->count == s->cap) {  /* grow, the keys kept oldest first */
      size_t cap = s->cap ? s->cap * 2 : 16;
      if (cap > s->limit) cap = s->limit;
      uint64_t *ring = malloc(cap * sizeof(uint64_t));
      if (ring == NULL) abort();
      for (size_t i = 0; i < s->count; i++) ring[i] = s->ring[(s->oldest + i) % s->cap];
      free(s->ring);
      s->ring = ring; s->cap = cap; s->oldest = 0;
    }
    s->ring[(s->oldest + s->count) % s->cap] = key;
    s->count++;
  }
  *map_slot(&s->set, key, 1) = (void *)1;
  return 1;
}
static void seen_free(seen_keys *s) {
  free(s->set.keys); free(s->set.vals); free(s->ring);
  size_t limit = s->limit;
  memset(s, 0, sizeof *s);
  s->limit = limit;
}

/* ---- timers: one heap for every timer of the loop ---- */

typedef struct timer timer;
struct timer { int64_t at; long pos; void (*fire)(timer *); };  /* pos -1: not armed */

typedef struct { timer **items; long n, cap; } heap;

static void heap_swap(heap *h, long i, long j) {
  timer *t = h->items[i]; h->items[i] = h->items[j]; h->items[j] = t;
  h->items[i]->pos = i; h->items[j]->pos = j;
}
static void heap_up(heap *h, long i) {
  while (i > 0) { long p = (i - 1) / 2; if (h->items[p]->at <= h->items[i]->at) break; heap_swap(h, i, p); i = p; }
}
static void heap_down(heap *h, long i) {
  for (;;) {
    long l = 2 * i + 1, r = l + 1, s = i;
    if (l < h->n && h->items[l]->at < h->items[s]->at) s = l;
    if (r < h->n && h->items[r]->at < h->items[s]->at) s = r;
    if (s == i) return;
    heap_swap(h, i, s); i = s;
  }
}
static void timer_cancel(heap *h, timer *t) {
  long i = t->pos;
  if (i < 0) return;
  t->pos = -1;
  h->n--;
  if (i < h->n) { h->items[i] = h->items[h->n]; h->items[i]->pos = i; heap_up(h, i); heap_down(h, h->items[i]->pos); }
}
static void timer_arm(heap *h, timer *t, int64_t at) {
  if (t->pos >= 0) timer_cancel(h, t);
  t->at = at;
  if (h->n == h->cap) {
    h->cap = h->cap ? h->cap * 2 : 256;
    h->items = realloc(h->items, (size_t)h->cap * sizeof(timer *));
    if (h->items == NULL) abort();
  }
  t->pos = h->n; h->items[h->n++] = t; heap_up(h, t->pos);
}

#define CONTAINER(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* ---- the engine's objects ---- */

typedef struct engine engine;
typedef struct conn conn;

typedef struct { int64_t at; char *kind; char *body; size_t body_n; } planned;

typedef struct round_t {
  struct round_t *next;
  char *name; char *channel;
  planned *plan; int n;
  int drop_after; int64_t start_us;
} round_t;

/* A send not yet acked: resent after a reconnect (the service deduplicates by client id). */
typedef struct pending {
  struct pending *prev, *next;  /* the connection's, in send order */
  conn *owner;
  uint64_t key;                 /* hash of client_msg_id and the connection; 0: not mapped */
  char *frame; size_t frame_n;  /* the JSON frame, unmasked */
  char *who, *conversation; int seq;
} pending;

enum { C_DOWN, C_CONNECTING, C_UPGRADING, C_HELLO, C_READY };

struct conn {
  engine *e;
  int fd, state, is_agent;
  void *owner;
  buf in, out, frag;
  int frag_opcode;
  int dirty, waiting_out;
  int ever_ready;
  int64_t last_id; int has_last_id;
  seen_keys seen;         /* message ids pushed on this link (a resume may replay some) */
  pending *first, *last;  /* unacked sends */
  timer step;             /* connect/login timeout, reconnect delay */
  timer ping;             /* heartbeat: a ping, then the wait for its pong */
  int ping_outstanding;
  int64_t reconnect_give_up_at, reconnect_delay;
  uint32_t index;         /* for keys of per-connection memories */
  uint32_t generation;    /* counts closes: a handler can tell its socket went */
  int closing;            /* closed for good: a failure now is not a reason to reconnect */
  int counted;            /* a customer's, in engine->connected */
};

#define RECENT 8  /* a customer's closed conversations whose late replies still count */

typedef struct {
  char *name; int64_t id; int closed, closing;
  uint64_t awaiting;  /* bit seq: a reply expected */
  timer deadline;
  struct customer *owner;
} conversation;

enum { S_IDLE, S_CONNECTING, S_OPENING, S_SENDING, S_GONE };

typedef struct customer {
  engine *e;
  char *name;         /* worker-prefixed: as WorkerEngine's customers */
  char *receiver;     /* "customer:<name>" */
  conn c;
  round_t *queue, *queue_tail;
  round_t *playing;
  int state, leaving, index, done;
  int64_t conversation_id, asked, earliest, connecting_since, open_give_up_at;
  conversation **convs; int n_convs, cap_convs;  /* in the order they were opened */
  int dead_link;      /* the session's link died for good: its next open fails */
  const char *dead_cause; char *dead_detail;
  timer send_timer, open_timer, next_round;
  long number;        /* the wrapper's number for it */
  int listed;         /* in e->alive: not ended (WorkerEngine.customers) */
} customer;

typedef struct agent {
  engine *e;
  char *id, *token, *sender;
  conn c;
} agent;

typedef struct handover {
  struct handover *next;
  long customer;  /* index into the wrapper's customer table */
  char *name;     /* worker-prefixed */
  round_t *round; /* NULL: the customer leaves */
} handover;

struct engine {
  PyObject_HEAD
  /* settings */
  struct sockaddr_storage addr; socklen_t addrlen;
  char *path, *host_header, *shop, *client_version, *run, *worker, *conn_prefix;
  char *agent_path, *agent_host_header, *url, *agent_url;
  struct sockaddr_storage agent_addr; socklen_t agent_addrlen;
  b2b_ctx keyed;
  char *reply_kind[64];
  char *replies[3];
  int64_t deadline_us, connect_timeout_us, reconnect_window_us, late_send_us;
  int64_t heartbeat_us, heartbeat_timeout_us;
  char *causes[8];  /* the Cause values, in this order: */
#define CAUSE_NOT_ACCEPTED 0
#define CAUSE_TRANSPORT 1
#define CAUSE_DISCONNECTED 2
#define CAUSE_UPGRADE_REFUSED 3
#define CAUSE_PROTOCOL 4
#define CAUSE_AUTH_REJECTED 5
#define CAUSE_SESSION_EXPIRED 6
#define CAUSE_ACCOUNT_FROZEN 7
  int n_agents; agent *agents;
  /* the loop thread */
  pthread_t thread; int thread_started, fds_open;
  int epfd, wakefd;
  heap timers;
  conn **dirty; long n_dirty, cap_dirty;
  customer **customers; long cap_customers;
  u64map unacked;      /* hash of (client_msg_id, connection) -> pending */
  seen_keys replied;   /* (conversation, seq): questions already answered */
  uint32_t mask_state;
  timer lag_timer;
  uint32_t next_conn_index;
  int agents_ready_count;
  buf rbuf;              /* what one read brought in, parsed from here */
  buf text;              /* a received text, unescaped */
  buf stamped;           /* a text being stamped */
  buf scratch;           /* a short-lived string */
  buf frame;             /* the frame being built */
  buf local_sends, local_acks, local_receipts, local_events;
  int64_t local_late, local_lag_max, local_forged, local_foreign, local_loop_lag;
  /* shared with Python, under lock */
  pthread_mutex_t lock;
  handover *in_head, *in_tail;
  int stopping;
  buf sends, acks, receipts, events;
  int64_t late_sends, send_lag_max_us, forged, foreign, loop_lag_max_us;
  int agents_ready;
  char *failure, *failure_cause;
  uint8_t *alive; long cap_alive;  /* customers whose connection is not closed for good */
  long connected;                  /* customers logged in now (for benchmarks and tests) */
};

static void set_alive(engine *e, long index, int alive) {
  pthread_mutex_lock(&e->lock);
  if (index >= e->cap_alive) {
    long cap = e->cap_alive ? e->cap_alive : 256;
    while (cap <= index) cap *= 2;
    uint8_t *grown = realloc(e->alive, (size_t)cap);
    if (grown == NULL) abort();
    memset(grown + e->cap_alive, 0, (size_t)(cap - e->cap_alive));
    e->alive = grown; e->cap_alive = cap;
  }
  e->alive[index] = (uint8_t)alive;
  pthread_mutex_unlock(&e->lock);
}

/* ---- output: records laid end to end, as WorkerEngine's EngineOutput ---- */

static void rec_str(buf *b, const char *s, size_t n) { uint32_t l = (uint32_t)n; buf_put(b, &l, 4); buf_put(b, s, n); }
static void rec_cstr(buf *b, const char *s) { rec_str(b, s, strlen(s)); }
static void rec_int(buf *b, int64_t v) { buf_put(b, &v, 8); }

static void out_send(engine *e, const char *who, const char *conv, size_t conv_n, int seq,
                     int64_t intended, int64_t sent, const char *kind) {
  buf *b = &e->local_sends;
  rec_cstr(b, who); rec_str(b, conv, conv_n); rec_int(b, seq); rec_int(b, intended);
  rec_int(b, sent); rec_cstr(b, kind);
}
static void out_ack(engine *e, const char *conv, int seq, int64_t at, const char *server_id, size_t sid_n) {
  buf *b = &e->local_acks;
  rec_cstr(b, conv); rec_int(b, seq); rec_int(b, at); rec_str(b, server_id, sid_n);
}
static void out_receipt(engine *e, const char *conv, size_t conv_n, int seq, const char *receiver, int64_t at) {
  buf *b = &e->local_receipts;
  rec_str(b, conv, conv_n); rec_int(b, seq); rec_cstr(b, receiver); rec_int(b, at);
}
static void out_event(engine *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out_event(engine *e, const char *fmt, ...) {
  char text[1024];
  va_list ap; va_start(ap, fmt);
  int n = vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  rec_str(&e->local_events, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
}
static void publish(engine *e) {  /* the loop's records so far, to where Python takes them */
  if (!e->local_sends.n && !e->local_acks.n && !e->local_receipts.n && !e->local_events.n
      && !e->local_late && !e->local_lag_max && !e->local_forged && !e->local_foreign
      && !e->local_loop_lag) return;
  pthread_mutex_lock(&e->lock);
  buf_put(&e->sends, e->local_sends.p, e->local_sends.n);
  buf_put(&e->acks, e->local_acks.p, e->local_acks.n);
  buf_put(&e->receipts, e->local_receipts.p, e->local_receipts.n);
  buf_put(&e->events, e->local_events.p, e->local_events.n);
  e->late_sends += e->local_late;
  e->forged += e->local_forged;
  e->foreign += e->local_foreign;
  if (e->local_lag_max > e->send_lag_max_us) e->send_lag_max_us = e->local_lag_max;
  if (e->local_loop_lag > e->loop_lag_max_us) e->loop_lag_max_us = e->local_loop_lag;
  pthread_mutex_unlock(&e->lock);
  e->local_sends.n = e->local_acks.n = e->local_receipts.n = e->local_events.n = 0;
  e->local_late = e->local_lag_max = e->local_forged = e->local_foreign = e->local_loop_lag = 0;
}

/* ---- stamps (chatprobe/stamp.py) ---- */

static void sign_hex(engine *e, const char *s, size_t n, char *out12) {
  b2b_ctx c = e->keyed; uint8_t d[6];
  static const char hx[] = "0123456789abcdef";
  b2b_update(&c, s, n); b2b_final(&c, d);
  for (int i = 0; i < 6; i++) { out12[2 * i] = hx[d[i] >> 4]; out12[2 * i + 1] = hx[d[i] & 15]; }
}
/* body [cp:run:sender:conversation:seq:intended hex:signature] into b */
static void stamp_into(engine *e, buf *b, const char *body, size_t bn, const char *sender,
                       size_t sender_n, const char *conv, size_t conv_n, int seq, int64_t intended) {
  size_t start = b->n;
  if (bn) { buf_put(b, body, bn); buf_put(b, " ", 1); }
  char t[64];
  buf_str(b, "[cp:"); buf_str(b, e->run); buf_put(b, ":", 1); buf_put(b, sender, sender_n);
  buf_put(b, ":", 1); buf_put(b, conv, conv_n);
  buf_put(b, t, (size_t)snprintf(t, sizeof t, ":%d:%llx:", seq, (unsigned long long)intended));
  buf_need(b, 13);
  sign_hex(e, b->p + start, b->n - start, b->p + b->n);
  b->n += 12;
  b->p[b->n++] = ']';
}

typedef struct { const char *conv; size_t conv_n; int seq; int valid, foreign; } stamp;

/* 0: no stamp (an ordinary message); else fills s */
static int parse_stamp(engine *e, const char *t, size_t n, stamp *s) {
  const char *start = NULL;
  for (size_t i = n; i >= 4; i--)
    if (t[i - 4] == '[' && memcmp(t + i - 4, "[cp:", 4) == 0) { start = t + i - 4; break; }
  if (start == NULL) return 0;
  const char *end = memchr(start, ']', (size_t)(t + n - start));
  if (end == NULL) return 0;
  const char *part[6]; size_t len[6]; int k = 0;
  const char *p = start + 4;
  for (;;) {
    const char *c = memchr(p, ':', (size_t)(end - p));
    if (k == 6) return 0;  /* more than six parts */
    part[k] = p; len[k] = (size_t)((c ? c : end) - p); k++;
    if (c == NULL) break;
    p = c + 1;
  }
  if (k != 6 || len[3] == 0 || len[4] == 0) return 0;
  int64_t seq = 0, intended = 0;
  for (size_t i = 0; i < len[3]; i++) {  /* int(): digits, an optional sign */
    char c = part[3][i];
    if (i == 0 && (c == '+' || c == '-') && len[3] > 1) continue;
    if (c < '0' || c > '9' || seq > 100000000) return 0;
    seq = seq * 10 + (c - '0');
  }
  if (part[3][0] == '-') seq = -seq;
  for (size_t i = 0; i < len[4]; i++) {
    int h = hexval(part[4][i]);
    if (h < 0 || intended > (INT64_MAX >> 4)) return 0;
    intended = intended * 16 + h;
  }
  s->conv = part[2]; s->conv_n = len[2];
  s->seq = (int)seq;
  size_t run_n = strlen(e->run);
  s->foreign = !(len[0] == run_n && memcmp(part[0], e->run, run_n) == 0);
  if (s->foreign) { s->valid = 0; return 1; }
  char sig[12];
  sign_hex(e, t, (size_t)(part[5] - t), sig);
  s->valid = end == t + n - 1 && len[5] == 12 && memcmp(sig, part[5], 12) == 0;
  return 1;
}

/* ---- connections ---- */

static void conn_lost(conn *c, const char *cause, const char *detail);
static void on_ready(conn *c, int resumed);
static void on_frame(conn *c, const char *p, size_t n);
static void link_dead(customer *cu, const char *cause, const char *detail);
static void session_failed(customer *cu, const char *cause, const char *detail);

static const char *who_of(conn *c) {
  return c->is_agent ? ((agent *)c->owner)->id : ((customer *)c->owner)->name;
}
static const char *url_of(conn *c) { return c->is_agent ? c->e->agent_url : c->e->url; }

static void mark_dirty(conn *c) {
  engine *e = c->e;
  if (c->dirty || c->waiting_out) return;
  c->dirty = 1;
  if (e->n_dirty == e->cap_dirty) {
    e->cap_dirty = e->cap_dirty ? e->cap_dirty * 2 : 256;
    e->dirty = realloc(e->dirty, (size_t)e->cap_dirty * sizeof(conn *));
    if (e->dirty == NULL) abort();
  }
  e->dirty[e->n_dirty++] = c;
}

static uint32_t next_mask(engine *e) {  /* xorshift: masks need not be secret from our target */
  uint32_t x = e->mask_state;
  x ^= x << 13; x ^= x >> 17; x ^= x << 5;
  return e->mask_state = x;
}

/* One masked client frame onto the connection's output (sent after the loop's step). */
static void ws_write(conn *c, int opcode, const char *payload, size_t n) {
  uint8_t hdr[14]; size_t h = 0;
  hdr[h++] = (uint8_t)(0x80 | opcode);
  if (n < 126) hdr[h++] = (uint8_t)(0x80 | n);
  else if (n < 65536) { hdr[h++] = 0xFE; hdr[h++] = (uint8_t)(n >> 8); hdr[h++] = n & 0xFF; }
  else { hdr[h++] = 0xFF; for (int i = 7; i >= 0; i--) hdr[h++] = (uint8_t)((uint64_t)n >> (8 * i)); }
  uint32_t m = next_mask(c->e); uint8_t mask[4]; memcpy(mask, &m, 4);
  memcpy(hdr + h, mask, 4); h += 4;
  buf_need(&c->out, h + n);
  memcpy(c->out.p + c->out.n, hdr, h); c->out.n += h;
  uint8_t *dst = (uint8_t *)c->out.p + c->out.n;
  for (size_t i = 0; i < n; i++) dst[i] = (uint8_t)payload[i] ^ mask[i & 3];
  c->out.n += n;
  mark_dirty(c);
}
/* A text frame, if the connection is up; else dropped (unacked sends are resent on resume). */
static void ws_text(conn *c, const char *p, size_t n) { if (c->state == C_READY) ws_write(c, 1, p, n); }

static void epoll_set(conn *c, int want_out) {
  struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(c->e->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void flush_one(conn *c) {
  size_t at = 0;
  while (at < c->out.n) {
    ssize_t w = send(c->fd, c->out.p + at, c->out.n - at, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      char detail[600];
      snprintf(detail, sizeof detail, "%s: %s", url_of(c), strerror(errno));
      conn_lost(c, c->e->causes[c->state == C_READY ? CAUSE_DISCONNECTED : CAUSE_TRANSPORT], detail);
      return;
    }
    at += (size_t)w;
  }
  if (at < c->out.n) {  /* the socket is full: the rest leaves when it drains */
    memmove(c->out.p, c->out.p + at, c->out.n - at);
    c->out.n -= at;
    c->waiting_out = 1;
    epoll_set(c, 1);
    return;
  }
  c->out.n = 0;
  if (c->out.cap > KEEP_BUFFER) buf_free(&c->out);
}

static void flush_dirty(engine *e) {
  /* by index: a flush that loses its connection may mark others (the array may grow) */
  for (long i = 0; i < e->n_dirty; i++) {
    conn *c = e->dirty[i];
    c->dirty = 0;
    if (c->fd >= 0 && c->out.n && !c->waiting_out) flush_one(c);
  }
  e->n_dirty = 0;
}

static void conn_close_fd(conn *c) {
  if (c->fd >= 0) {
    epoll_ctl(c->e->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
  }
  c->generation++;
  c->in.n = c->out.n = c->frag.n = 0;
  c->waiting_out = 0;
  c->ping_outstanding = 0;
}

static void count_connected(conn *c, int up) {
  if (c->is_agent || c->counted == up) return;
  c->counted = up;
  pthread_mutex_lock(&c->e->lock);
  c->e->connected += up ? 1 : -1;
  pthread_mutex_unlock(&c->e->lock);
}

/* The socket goes and every timer of the connection with it. */
static void conn_abort(conn *c) {
  count_connected(c, 0);
  conn_close_fd(c);
  timer_cancel(&c->e->timers, &c->step);
  timer_cancel(&c->e->timers, &c->ping);
  c->state = C_DOWN;
}

static void pending_unlink(pending *p) {
  conn *c = p->owner;
  if (p->prev) p->prev->next = p->next; else c->first = p->next;
  if (p->next) p->next->prev = p->prev; else c->last = p->prev;
  free(p->frame); free(p->who); free(p->conversation);
  free(p);
}

/* A send waits for its ack: found by its client id on its own connection's acks only. */
static void pending_add(conn *c, const char *frame, size_t frame_n, const char *client_id,
                        size_t id_n, const char *who, const char *conv, size_t conv_n, int seq) {
  engine *e = c->e;
  pending *p = calloc(1, sizeof *p);
  if (p == NULL) abort();
  p->owner = c;
  p->key = hash_bytes(client_id, id_n, c->index);
  p->frame = dup_n(frame, frame_n); p->frame_n = frame_n;
  p->who = strdup(who); p->conversation = dup_n(conv, conv_n); p->seq = seq;
  if (p->who == NULL) abort();
  p->prev = c->last;
  if (c->last) c->last->next = p; else c->first = p;
  c->last = p;
  void **slot = map_slot(&e->unacked, p->key, 1);
  if (*slot == NULL) *slot = p;
  else p->key = 0;  /* a 64-bit hash collision: resent on resume, its ack not recorded */
}

static void pending_done(pending *p) {
  if (p->key) map_del(&p->owner->e->unacked, p->key);
  pending_unlink(p);
}

static pending *pending_find(conn *c, const char *client_id, size_t id_n) {
  pending *p = map_get(&c->e->unacked, hash_bytes(client_id, id_n, c->index));
  return p != NULL && p->owner == c ? p : NULL;
}

/* Every unacked send of c learns it failed (WorkerEngine._on_ack with an error). */
static void fail_pending(conn *c, const char *cause, const char *detail) {
  while (c->first) {
    pending *p = c->first;
    out_event(c->e, "%s: message refused: %s: %s", p->who, cause, detail);
    pending_done(p);
  }
}

/* A new link (after a session failed) starts with no memory of the old one, as Python's. */
static void conn_forget(conn *c) {
  seen_free(&c->seen);
  c->has_last_id = 0; c->last_id = 0;
  c->ever_ready = 0;
}

/* The connection closes for good: what is unacked is reported as the session closing. */
static void conn_finish(conn *c) {
  engine *e = c->e;
  c->closing = 1;
  if (c->fd >= 0 && c->state == C_READY && c->out.n && !c->waiting_out) flush_one(c);
  fail_pending(c, e->causes[CAUSE_DISCONNECTED], "the session was closed");
  conn_abort(c);
  c->closing = 0;
}

static void step_fired(timer *t);
static void ping_fired(timer *t);

static void conn_init(engine *e, conn *c, int is_agent, void *owner) {
  memset(c, 0, sizeof *c);
  c->e = e; c->fd = -1; c->is_agent = is_agent; c->owner = owner;
  c->step.pos = c->ping.pos = -1;
  c->step.fire = step_fired; c->ping.fire = ping_fired;
  c->index = ++e->next_conn_index;
  c->seen.limit = SEEN_LIMIT;
}

static void conn_begin_attempt(conn *c) {
  engine *e = c->e;
  const struct sockaddr_storage *addr = c->is_agent ? &e->agent_addr : &e->addr;
  socklen_t addrlen = c->is_agent ? e->agent_addrlen : e->addrlen;
  char detail[600];
  c->state = C_CONNECTING;
  c->fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    snprintf(detail, sizeof detail, "%s: %s", url_of(c), strerror(errno));
    conn_lost(c, e->causes[CAUSE_TRANSPORT], detail);
    return;
  }
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  timer_arm(&e->timers, &c->step, mono_us() + e->connect_timeout_us);
  if (connect(c->fd, (const struct sockaddr *)addr, addrlen) < 0 && errno != EINPROGRESS) {
    snprintf(detail, sizeof detail, "%s: %s", url_of(c), strerror(errno));
    conn_lost(c, e->causes[CAUSE_TRANSPORT], detail);
    return;
  }
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void conn_send_upgrade(conn *c) {
  engine *e = c->e;
  uint8_t nonce[16];
  if (getrandom(nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
    for (int i = 0; i < 16; i++) nonce[i] = (uint8_t)next_mask(e);
  static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char key[25]; int k = 0;
  for (int i = 0; i < 15; i += 3) {
    uint32_t v = ((uint32_t)nonce[i] << 16) | ((uint32_t)nonce[i + 1] << 8) | nonce[i + 2];
    key[k++] = b64[v >> 18]; key[k++] = b64[(v >> 12) & 63]; key[k++] = b64[(v >> 6) & 63]; key[k++] = b64[v & 63];
  }
  uint32_t v = (uint32_t)nonce[15] << 16;
  key[k++] = b64[v >> 18]; key[k++] = b64[(v >> 12) & 63]; key[k++] = '='; key[k++] = '='; key[k] = 0;
  buf_str(&c->out, "GET "); buf_str(&c->out, c->is_agent ? e->agent_path : e->path);
  buf_str(&c->out, " HTTP/1.1\r\nHost: "); buf_str(&c->out, c->is_agent ? e->agent_host_header : e->host_header);
  buf_str(&c->out, "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
  buf_str(&c->out, key);
  buf_str(&c->out, "\r\nSec-WebSocket-Version: 13\r\nUser-Agent: chatprobe\r\n\r\n");
  c->state = C_UPGRADING;
  mark_dirty(c);
}

static void conn_send_hello(conn *c) {
  engine *e = c->e;
  buf *f = &e->frame;
  f->n = 0;
  buf_str(f, "{\"type\":\"hello\",\"role\":");
  if (c->is_agent) {
    agent *a = c->owner;
    buf_str(f, "\"agent\",\"shop\":"); buf_json(f, e->shop, strlen(e->shop));
    buf_str(f, ",\"agent\":"); buf_json(f, a->id, strlen(a->id));
    buf_str(f, ",\"token\":"); buf_json(f, a->token, strlen(a->token));
  } else {
    customer *cu = c->owner;
    buf_str(f, "\"customer\",\"shop\":"); buf_json(f, e->shop, strlen(e->shop));
    buf_str(f, ",\"customer\":");
    buf id = {0};
    buf_str(&id, e->conn_prefix); buf_str(&id, cu->name);
    buf_json(f, id.p, id.n);
    buf_free(&id);
  }
  buf_str(f, ",\"client_version\":"); buf_json(f, e->client_version, strlen(e->client_version));
  if (c->ever_ready && c->has_last_id) { buf_str(f, ",\"resume_after\":"); buf_int(f, c->last_id); }
  buf_str(f, "}");
  ws_write(c, 1, f->p, f->n);  /* not ws_text: the connection is not up until the welcome */
  c->state = C_HELLO;
  timer_arm(&e->timers, &c->step, mono_us() + e->connect_timeout_us);
}

static int permanent_cause(engine *e, const char *cause) {  /* link.PERMANENT */
  return cause == e->causes[CAUSE_AUTH_REJECTED] || cause == e->causes[CAUSE_SESSION_EXPIRED]
      || cause == e->causes[CAUSE_ACCOUNT_FROZEN] || cause == e->causes[CAUSE_PROTOCOL];
}

/* The link is gone for good (ReconnectingLink.die). */
static void conn_die(conn *c, const char *cause, const char *detail) {
  engine *e = c->e;
  out_event(e, "%s dead: %s: %s", who_of(c), cause, detail);
  fail_pending(c, cause, detail);
  conn_abort(c);
  if (!c->is_agent) link_dead(c->owner, cause, detail);
}

/* A connection attempt failed, or an established connection was lost. ``cause`` is one of
 * e->causes (compared by address). */
static void conn_lost(conn *c, const char *cause, const char *detail) {
  engine *e = c->e;
  int was_ready = c->state == C_READY;
  conn_abort(c);
  if (c->closing) return;
  if (!c->ever_ready) {
    /* the link's first connection: the login fails outright, as adapter.connect_* does */
    if (c->is_agent) {
      char text[900];
      snprintf(text, sizeof text, "agent login failed: %s: %s", cause, detail);
      pthread_mutex_lock(&e->lock);
      if (e->failure == NULL) { e->failure = strdup(text); e->failure_cause = strdup(cause); }
      pthread_mutex_unlock(&e->lock);
    } else session_failed(c->owner, cause, detail);
    return;
  }
  if (permanent_cause(e, cause)) { conn_die(c, cause, detail); return; }
  int64_t now = mono_us();
  if (was_ready) {
    out_event(e, "%s disconnected: connection closed by the target or network", who_of(c));
    c->reconnect_give_up_at = now + e->reconnect_window_us;
    c->reconnect_delay = 50000;
    if (!c->is_agent) {
      customer *cu = c->owner;
      /* an open waits for the reconnect (ReconnectingLink.ask), within its own budget */
      if (cu->state == S_OPENING) timer_arm(&e->timers, &cu->open_timer, cu->open_give_up_at);
    }
    conn_begin_attempt(c);  /* at once, as ReconnectingLink._reconnect */
    return;
  }
  if (now < c->reconnect_give_up_at) {
    timer_arm(&e->timers, &c->step, now + c->reconnect_delay);  /* step_fired: try again */
    c->reconnect_delay = c->reconnect_delay * 2 > 1000000 ? 1000000 : c->reconnect_delay * 2;
    return;
  }
  conn_die(c, cause, detail);
}

static void step_fired(timer *t) {
  conn *c = CONTAINER(t, conn, step);
  engine *e = c->e;
  if (c->state == C_DOWN) { conn_begin_attempt(c); return; }  /* a reconnect's pause is over */
  char detail[700];
  if (c->state == C_HELLO) snprintf(detail, sizeof detail, "no answer during login");
  else snprintf(detail, sizeof detail, "%s: no answer within %g s (the target or the network hangs)",
                url_of(c), (double)e->connect_timeout_us / 1e6);
  conn_lost(c, e->causes[CAUSE_TRANSPORT], detail);
}

static void ping_fired(timer *t) {
  conn *c = CONTAINER(t, conn, ping);
  engine *e = c->e;
  if (c->state != C_READY) return;
  if (c->ping_outstanding) {
    char detail[120];
    snprintf(detail, sizeof detail, "no pong within %g s", (double)e->heartbeat_timeout_us / 1e6);
    conn_lost(c, e->causes[CAUSE_DISCONNECTED], detail);
    return;
  }
  ws_write(c, 9, "cp", 2);
  c->ping_outstanding = 1;
  timer_arm(&e->timers, &c->ping, mono_us() + e->heartbeat_timeout_us);
}

static void conn_start(conn *c) {
  c->reconnect_give_up_at = mono_us() + c->e->reconnect_window_us;
  c->reconnect_delay = 50000;
  conn_begin_attempt(c);
}

static void on_http_answer(conn *c) {
  engine *e = c->e;
  char *end = memmem(c->in.p, c->in.n, "\r\n\r\n", 4);
  if (end == NULL) {
    if (c->in.n > 16384) conn_lost(c, e->causes[CAUSE_PROTOCOL], "WebSocket handshake failed: answer too long");
    return;
  }
  const char *p = c->in.p;
  int status = -1;
  if (end - p >= 12 && memcmp(p, "HTTP/1.", 7) == 0 && p[8] == ' '
      && p[9] >= '0' && p[9] <= '9' && p[10] >= '0' && p[10] <= '9' && p[11] >= '0' && p[11] <= '9')
    status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
  if (status < 0) { conn_lost(c, e->causes[CAUSE_PROTOCOL], "WebSocket handshake failed: not an HTTP answer"); return; }
  if (status != 101) {
    char detail[120];
    snprintf(detail, sizeof detail, "WebSocket upgrade refused: HTTP %d", status);
    conn_lost(c, e->causes[CAUSE_UPGRADE_REFUSED], detail);
    return;
  }
  size_t head = (size_t)(end + 4 - c->in.p);
  memmove(c->in.p, c->in.p + head, c->in.n - head);
  c->in.n -= head;
  conn_send_hello(c);
}

#define MAX_MESSAGE (16u << 20)  /* a frame or a fragmented message longer: a protocol error */

/* Frames from what was read (in: the shared buffer, or the connection's own holding a
 * partial frame); a partial frame left over is kept by the connection. */
static void take_input(conn *c, buf *in) {
  engine *e = c->e;
  if (c->state == C_UPGRADING) {
    if (in == &e->rbuf) { buf_put(&c->in, e->rbuf.p, e->rbuf.n); e->rbuf.n = 0; in = &c->in; }
    on_http_answer(c);
    if (c->state != C_HELLO) return;
  }
  size_t at = 0;
  uint32_t generation = c->generation;
  while (in->n - at >= 2) {
    const uint8_t *b = (const uint8_t *)in->p + at;
    size_t avail = in->n - at, len = b[1] & 0x7F, h = 2;
    if (b[1] & 0x80) { conn_lost(c, e->causes[CAUSE_PROTOCOL], "a masked frame from the server"); return; }
    if (len == 126) { if (avail < 4) break; len = ((size_t)b[2] << 8) | b[3]; h = 4; }
    else if (len == 127) {
      if (avail < 10) break;
      uint64_t l = 0;
      for (int i = 0; i < 8; i++) l = (l << 8) | b[2 + i];
      if (l > MAX_MESSAGE) { conn_lost(c, e->causes[CAUSE_PROTOCOL], "a frame over 16 MiB"); return; }
      len = (size_t)l; h = 10;
    }
    if (avail < h + len) break;
    int fin = b[0] & 0x80, opcode = b[0] & 0x0F;
    const char *payload = (const char *)b + h;
    at += h + len;
    if (opcode == 9) ws_write(c, 10, payload, len);
    else if (opcode == 10) {
      c->ping_outstanding = 0;
      if (e->heartbeat_us > 0) timer_arm(&e->timers, &c->ping, mono_us() + e->heartbeat_us);
    } else if (opcode == 8) {
      conn_lost(c, c->state == C_READY ? e->causes[CAUSE_DISCONNECTED] : e->causes[CAUSE_TRANSPORT],
                c->state == C_READY ? "connection closed by the target" : "connection closed during login");
      return;
    } else if (opcode == 0 || !fin) {  /* a fragmented message */
      if (opcode != 0) { c->frag.n = 0; c->frag_opcode = opcode; }
      if (c->frag.n + len > MAX_MESSAGE) { conn_lost(c, e->causes[CAUSE_PROTOCOL], "a message over 16 MiB"); return; }
      buf_put(&c->frag, payload, len);
      if (fin) {
        if (c->frag_opcode == 1) on_frame(c, c->frag.p, c->frag.n);
        if (c->generation != generation) { e->rbuf.n = 0; return; }
        buf_free(&c->frag);
      }
    } else if (opcode == 1) on_frame(c, payload, len);
    /* binary frames: the reference protocol sends none */
    if (c->generation != generation) { e->rbuf.n = 0; return; }  /* lost while handling */
  }
  size_t rest = in->n - at;
  if (in == &e->rbuf) {
    if (rest) buf_put(&c->in, in->p + at, rest);
    e->rbuf.n = 0;
  } else {
    if (rest == 0) buf_free(&c->in);  /* the frame it held is whole: idle, it holds nothing */
    else { memmove(c->in.p, c->in.p + at, rest); c->in.n = rest; }
  }
}

static void on_readable(conn *c) {
  engine *e = c->e;
  /* Reads land in one buffer the loop shares: an idle connection holds no read buffer of
   * its own, only the start of a frame that has not all arrived. */
  buf *in = c->in.n ? &c->in : &e->rbuf;
  e->rbuf.n = 0;
  const char *lost = NULL;  /* the connection ended: handled after what came before it */
  char detail[600] = "";
  for (;;) {
    buf_need(in, 65536);
    ssize_t r = recv(c->fd, in->p + in->n, in->cap - in->n, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      snprintf(detail, sizeof detail, "%s: %s", url_of(c), strerror(errno));
      lost = c->state == C_READY ? e->causes[CAUSE_DISCONNECTED] : e->causes[CAUSE_TRANSPORT];
      break;
    }
    if (r == 0) {
      snprintf(detail, sizeof detail, "%s", c->state == C_READY
               ? "connection closed by the target or network" : "connection closed during login");
      lost = c->state == C_READY ? e->causes[CAUSE_DISCONNECTED] : e->causes[CAUSE_TRANSPORT];
      break;
    }
    in->n += (size_t)r;
    if (in->n < in->cap) break;  /* drained: no second call to hear EAGAIN */
  }
  uint32_t generation = c->generation;
  take_input(c, in);
  e->rbuf.n = 0;
  if (lost != NULL && c->generation == generation) conn_lost(c, lost, detail);
}

static void on_writable(conn *c) {
  engine *e = c->e;
  if (c->state == C_CONNECTING) {
    int err = 0; socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      char detail[600];
      snprintf(detail, sizeof detail, "%s: %s", url_of(c), strerror(err));
      conn_lost(c, e->causes[CAUSE_TRANSPORT], detail);
      return;
    }
    epoll_set(c, 0);
    conn_send_upgrade(c);
    return;
  }
  if (c->waiting_out) {
    c->waiting_out = 0;
    epoll_set(c, 0);
    mark_dirty(c);
  }
}

/* ---- customers ---- */

static void customer_next_round(customer *cu);
static void answers_deadline(timer *t);

static void round_free(round_t *r) {
  if (r == NULL) return;
  for (int i = 0; i < r->n; i++) { free(r->plan[i].kind); free(r->plan[i].body); }
  free(r->plan); free(r->name); free(r->channel); free(r);
}

/* What was planned and not sent is recorded as sent (the customer tried): the ledger calls
 * it lost at its deadline instead of never knowing of it. */
static void record_unsent(engine *e, round_t *r, int done) {
  int64_t now = mono_us();
  for (int i = done; i < r->n; i++)
    out_send(e, r->name, r->name, strlen(r->name), i + 1, r->plan[i].at, now, r->plan[i].kind);
}

static conversation *conv_new(customer *cu, const char *name, int64_t id) {
  if (cu->n_convs == cu->cap_convs) {
    cu->cap_convs = cu->cap_convs ? cu->cap_convs * 2 : RECENT + 2;
    cu->convs = realloc(cu->convs, (size_t)cu->cap_convs * sizeof(conversation *));
    if (cu->convs == NULL) abort();
  }
  conversation *cv = calloc(1, sizeof *cv);
  if (cv == NULL) abort();
  cv->name = strdup(name); cv->id = id; cv->owner = cu;
  cv->deadline.pos = -1; cv->deadline.fire = answers_deadline;
  cu->convs[cu->n_convs++] = cv;
  return cv;
}

static void conv_remove(customer *cu, int i) {
  conversation *cv = cu->convs[i];
  timer_cancel(&cu->e->timers, &cv->deadline);
  free(cv->name); free(cv);
  memmove(cu->convs + i, cu->convs + i + 1, (size_t)(cu->n_convs - i - 1) * sizeof(conversation *));
  cu->n_convs--;
}

/* Late answers to a recently closed round still count; older closed rounds are forgotten, so
 * that at most RECENT are kept unless more are still open (_close_when_answered). */
static void conv_prune(customer *cu) {
  for (int i = 0; i < cu->n_convs && cu->n_convs > RECENT;) {
    if (cu->convs[i]->closed) conv_remove(cu, i);
    else i++;
  }
}

static int open_conversations(customer *cu) {
  int open = 0;
  for (int i = 0; i < cu->n_convs; i++) open += !cu->convs[i]->closed;
  return open;
}

/* A leaving customer whose conversations are all closed goes, its connection with it. */
static void list_customer(customer *cu, int listed) {  /* in open_customers() or not */
  if (cu->listed == listed) return;
  cu->listed = listed;
  set_alive(cu->e, cu->number, listed);
}

/* A gone customer keeps its struct (its number may come back) and nothing else: users come
 * and go all through a long run. */
static void customer_release(customer *cu) {
  while (cu->n_convs) conv_remove(cu, cu->n_convs - 1);
  free(cu->convs); cu->convs = NULL; cu->cap_convs = 0;
  seen_free(&cu->c.seen);
  buf_free(&cu->c.in); buf_free(&cu->c.out); buf_free(&cu->c.frag);
  free(cu->dead_detail); cu->dead_detail = NULL;
}

static void maybe_gone(customer *cu) {
  if (!cu->leaving || cu->playing || cu->state == S_GONE || open_conversations(cu)) return;
  engine *e = cu->e;
  conn_finish(&cu->c);
  timer_cancel(&e->timers, &cu->next_round);
  cu->state = S_GONE;
  list_customer(cu, 0);
  customer_release(cu);
}

/* May free cv (pruned) and end the customer (maybe_gone). */
static void conv_close(customer *cu, conversation *cv) {
  engine *e = cu->e;
  timer_cancel(&e->timers, &cv->deadline);
  cv->closing = 0;
  if (!cv->closed) {
    cv->closed = 1;
    if (!cu->dead_link) {
      buf *f = &e->frame; f->n = 0;
      buf_str(f, "{\"type\":\"close\",\"conversation\":"); buf_int(f, cv->id); buf_str(f, "}");
      ws_text(&cu->c, f->p, f->n);
    }
  }
  conv_prune(cu);
  maybe_gone(cu);
}

/* Stay for the answers (bounded by the deadline), then close (_close_when_answered). */
static void conv_close_when_answered(customer *cu, conversation *cv) {
  if (cv->awaiting == 0 || cu->dead_link) { conv_close(cu, cv); return; }
  cv->closing = 1;
  timer_arm(&cu->e->timers, &cv->deadline, mono_us() + cu->e->deadline_us);
}

static void answers_deadline(timer *t) {
  conversation *cv = CONTAINER(t, conversation, deadline);
  conv_close(cv->owner, cv);
}

static conversation *conv_playing(customer *cu) {
  for (int i = cu->n_convs - 1; i >= 0; i--)
    if (cu->convs[i]->id == cu->conversation_id && !cu->convs[i]->closed) return cu->convs[i];
  return NULL;
}

static void round_over(customer *cu) {
  engine *e = cu->e;
  round_t *r = cu->playing;
  cu->playing = NULL;
  cu->state = S_IDLE;
  timer_cancel(&e->timers, &cu->send_timer);
  round_free(r);
  conversation *cv = conv_playing(cu);
  if (cv != NULL && !cv->closing) conv_close_when_answered(cu, cv);
  if (cu->state != S_GONE) customer_next_round(cu);
}

static void send_open(customer *cu) {
  engine *e = cu->e;
  round_t *r = cu->playing;
  buf *f = &e->frame; f->n = 0;
  buf_str(f, "{\"type\":\"open\",\"ref\":"); buf_json(f, r->name, strlen(r->name));
  buf_str(f, ",\"channel\":"); buf_json(f, r->channel, strlen(r->channel)); buf_str(f, "}");
  ws_text(&cu->c, f->p, f->n);
  /* each asking waits the connect timeout, all of them together the reconnect window more */
  int64_t at = mono_us() + e->connect_timeout_us;
  timer_arm(&e->timers, &cu->open_timer, at < cu->open_give_up_at ? at : cu->open_give_up_at);
}

static void start_round(customer *cu, round_t *r) {
  engine *e = cu->e;
  int64_t now = mono_us();
  cu->playing = r;
  cu->index = cu->done = 0;
  /* the time the target takes to connect and open is its own, not the generator's delay */
  cu->asked = cu->connecting_since ? cu->connecting_since : now;
  cu->connecting_since = 0;
  cu->state = S_OPENING;
  cu->open_give_up_at = now + e->connect_timeout_us + e->reconnect_window_us;
  send_open(cu);
}

/* The session failed (WorkerEngine._run_customer's TargetError): the event, the session
 * closed, the rounds whose time has come recorded as sent, later ones connect anew then. */
static void session_failed(customer *cu, const char *cause, const char *detail) {
  engine *e = cu->e;
  conn *c = &cu->c;
  out_event(e, "%s dead: %s: %s", cu->name, cause, detail);
  timer_cancel(&e->timers, &cu->open_timer);
  timer_cancel(&e->timers, &cu->send_timer);
  if (cu->playing) { record_unsent(e, cu->playing, cu->done); round_free(cu->playing); cu->playing = NULL; }
  conn_finish(c);
  conn_forget(c);
  cu->dead_link = 0;
  for (int i = 0; i < cu->n_convs; i++) { timer_cancel(&e->timers, &cu->convs[i]->deadline); cu->convs[i]->closed = 1; }
  conv_prune(cu);
  int64_t now = mono_us();
  round_t **link = &cu->queue, *last = NULL;
  while (*link) {
    round_t *r = *link;
    if (cu->leaving || r->start_us <= now) {
      if (!cu->leaving) record_unsent(e, r, 0);
      *link = r->next;
      round_free(r);
    } else { last = r; link = &r->next; }
  }
  cu->queue_tail = last;
  cu->state = S_IDLE;
  if (cu->leaving) { maybe_gone(cu); return; }
  if (cu->queue) timer_arm(&e->timers, &cu->next_round, cu->queue->start_us);
  else list_customer(cu, 0);  /* over, as WorkerEngine's customer task; a new round revives it */
}

/* The link died for good (after its reconnects): a round being opened fails with it; a round
 * being sent goes on, each message refused as it comes; the next round's open fails. */
static void link_dead(customer *cu, const char *cause, const char *detail) {
  engine *e = cu->e;
  cu->dead_link = 1;
  cu->dead_cause = cause;
  free(cu->dead_detail);
  cu->dead_detail = strdup(detail);
  if (cu->state == S_OPENING && cu->playing) {
    timer_cancel(&e->timers, &cu->open_timer);
    session_failed(cu, cause, detail);
    return;
  }
  for (int i = 0; i < cu->n_convs; i++)
    if (cu->convs[i]->closing) conv_close(cu, cu->convs[i]), i = -1;  /* the list may change */
  /* rounds queued while it reconnected: their opens fail now, as Python's would */
  if (cu->state != S_GONE && !cu->playing) customer_next_round(cu);
}

/* Take the next round handed over, if any and the session is up. */
static void customer_next_round(customer *cu) {
  conn *c = &cu->c;
  if (cu->playing || cu->state == S_GONE) return;
  if (cu->dead_link) {
    if (cu->queue) {  /* its open fails at once: the session is dead */
      round_t *r = cu->queue;
      cu->queue = r->next;
      if (cu->queue == NULL) cu->queue_tail = NULL;
      cu->playing = r;
      cu->done = 0;
      session_failed(cu, cu->dead_cause, cu->dead_detail);
    } else maybe_gone(cu);
    return;
  }
  if (cu->leaving) {  /* what is queued never happens; the connection goes once answered */
    while (cu->queue) { round_t *r = cu->queue; cu->queue = r->next; round_free(r); }
    cu->queue_tail = NULL;
    maybe_gone(cu);
    return;
  }
  if (!c->ever_ready && c->state == C_DOWN && c->step.pos < 0) {  /* no session */
    if (cu->queue == NULL || cu->next_round.pos >= 0) return;  /* connects when a round is due */
    cu->connecting_since = mono_us();
    cu->state = S_CONNECTING;
    conn_start(c);
    return;
  }
  if (c->state != C_READY || !c->ever_ready) {  /* on_ready starts it */
    /* a round waiting for the reconnect waits for the target, not for the generator */
    if (cu->queue && !cu->connecting_since) cu->connecting_since = mono_us();
    return;
  }
  if (cu->queue) {
    round_t *r = cu->queue;
    cu->queue = r->next;
    if (cu->queue == NULL) cu->queue_tail = NULL;
    start_round(cu, r);
  }
}

static void next_round_due(timer *t) {
  customer *cu = CONTAINER(t, customer, next_round);
  customer_next_round(cu);
}

static void open_timed_out(timer *t) {
  customer *cu = CONTAINER(t, customer, open_timer);
  if (cu->state != S_OPENING || cu->playing == NULL) return;
  session_failed(cu, cu->e->causes[CAUSE_TRANSPORT], "no answer to a request in time");
}

static void send_message(customer *cu, int64_t sent) {
  engine *e = cu->e;
  conn *c = &cu->c;
  round_t *r = cu->playing;
  planned *p = &r->plan[cu->index];
  /* latency still counts from the plan; lateness is the generator's own share */
  int64_t base = p->at > cu->earliest ? p->at : cu->earliest;
  int64_t lag = sent - base;
  if (lag > e->late_send_us) e->local_late++;
  if (lag > e->local_lag_max) e->local_lag_max = lag;
  int seq = cu->index + 1;
  size_t name_n = strlen(r->name);
  out_send(e, r->name, r->name, name_n, seq, p->at, sent, p->kind);
  cu->done = seq;
  conversation *cv = conv_playing(cu);
  if (seq < 64 && e->reply_kind[seq] && cv) cv->awaiting |= 1ULL << seq;
  cu->index++;
  if (cu->dead_link) {
    out_event(e, "%s: message refused: %s: %s", cu->name, cu->dead_cause, cu->dead_detail);
  } else {
    /* {"type":"send","conversation":N,"client_msg_id":"run-name-seq","text":"..."} */
    buf *f = &e->frame; f->n = 0;
    buf_str(f, "{\"type\":\"send\",\"conversation\":"); buf_int(f, cu->conversation_id);
    buf_str(f, ",\"client_msg_id\":\"");
    size_t id_start = f->n;
    buf_str(f, e->run); buf_put(f, "-", 1); buf_put(f, r->name, name_n); buf_put(f, "-", 1); buf_int(f, seq);
    size_t id_end = f->n;
    buf_str(f, "\",\"text\":");
    e->stamped.n = 0;
    stamp_into(e, &e->stamped, p->body, p->body_n, r->name, name_n, r->name, name_n, seq, p->at);
    buf_json(f, e->stamped.p, e->stamped.n);
    buf_str(f, "}");
    pending_add(c, f->p, f->n, f->p + id_start, id_end - id_start, cu->name, r->name, name_n, seq);
    ws_text(c, f->p, f->n);  /* while reconnecting: the resume resends it */
    if (seq - 1 == r->drop_after && c->state == C_READY) {
      /* a mobile customer: the connection drops (no close handshake) and resumes */
      out_event(e, "%s dropped its connection", cu->name);
      flush_one(c);
      if (c->state == C_READY) conn_lost(c, e->causes[CAUSE_DISCONNECTED], "dropped on purpose");
      if (cu->playing != r) return;  /* the session failed meanwhile */
    }
  }
  if (cu->index < r->n) timer_arm(&e->timers, &cu->send_timer, r->plan[cu->index].at);
  else round_over(cu);
}

static void send_due(timer *t) {
  customer *cu = CONTAINER(t, customer, send_timer);
  if (cu->playing == NULL || cu->state != S_SENDING) return;
  if (cu->leaving) { round_over(cu); return; }  /* the user was stopped: the rest never happens */
  send_message(cu, mono_us());
}

/* ---- frames ---- */

static void on_ready(conn *c, int resumed) {
  engine *e = c->e;
  timer_cancel(&e->timers, &c->step);
  if (e->heartbeat_us > 0) timer_arm(&e->timers, &c->ping, mono_us() + e->heartbeat_us);
  if (resumed) out_event(e, "%s resumed: reconnected", who_of(c));
  /* resend what the target may never have received; it deduplicates by client id */
  for (pending *p = c->first; p; p = p->next) ws_text(c, p->frame, p->frame_n);
  c->ever_ready = 1;
  if (c->is_agent) {
    if (!resumed) {
      e->agents_ready_count++;
      if (e->agents_ready_count == e->n_agents) {
        pthread_mutex_lock(&e->lock); e->agents_ready = 1; pthread_mutex_unlock(&e->lock);
      }
    }
    return;
  }
  customer *cu = c->owner;
  count_connected(c, 1);
  if (cu->state == S_OPENING && cu->playing) { send_open(cu); return; }  /* asked again */
  if (cu->state == S_CONNECTING) cu->state = S_IDLE;
  customer_next_round(cu);
}

static void on_welcome(conn *c, const field *f, int n) {
  int64_t last;
  int resumed = c->ever_ready;
  /* nothing seen yet: a later resume must still replay what arrives from now on */
  if (!c->has_last_id && int_of(GET(f, n, "last_id"), &last)) { c->last_id = last; c->has_last_id = 1; }
  c->state = C_READY;
  on_ready(c, resumed);
}

/* A string field's value, unescaped and cut to fit ``out`` (for messages and codes). */
static void text_of(const field *fl, char *out, size_t size, const char *missing) {
  snprintf(out, size, "%s", missing);
  if (fl == NULL || fl->what != J_STR) return;
  char *tmp = malloc(fl->vn + 1);
  if (tmp == NULL) abort();
  long k = unescape(fl->v, fl->vn, tmp);
  if (k >= 0) snprintf(out, size, "%.*s", (int)k, tmp);
  free(tmp);
}

static void on_error_frame(conn *c, const field *f, int n) {
  engine *e = c->e;
  char code[128], message[512];
  text_of(GET(f, n, "code"), code, sizeof code, "None");
  text_of(GET(f, n, "message"), message, sizeof message, "");
  const char *login_cause = !strcmp(code, "auth_failed") || !strcmp(code, "unknown_shop") ? e->causes[CAUSE_AUTH_REJECTED]
      : !strcmp(code, "session_expired") ? e->causes[CAUSE_SESSION_EXPIRED]
      : !strcmp(code, "account_frozen") ? e->causes[CAUSE_ACCOUNT_FROZEN] : NULL;
  char detail[700];
  if (c->state == C_HELLO) {  /* the hello was refused */
    snprintf(detail, sizeof detail, "login refused: %s (%s)", code, message);
    conn_lost(c, login_cause ? login_cause : !strcmp(code, "bad_frame") ? e->causes[CAUSE_PROTOCOL]
              : e->causes[CAUSE_AUTH_REJECTED], detail);
    return;
  }
  if (login_cause) {
    snprintf(detail, sizeof detail, "session ended by target: %s", code);
    conn_die(c, login_cause, detail);
    return;
  }
  const field *cid = GET(f, n, "client_msg_id");
  if (cid && cid->what == J_STR) {
    pending *p = pending_find(c, cid->v, cid->vn);
    if (p) {
      out_event(e, "%s: message refused: %s: %s: %s", p->who, e->causes[CAUSE_NOT_ACCEPTED], code, message);
      pending_done(p);
      return;
    }
  }
  const field *ref = GET(f, n, "ref");
  if (!c->is_agent && ref && ref->what == J_STR) {
    customer *cu = c->owner;
    if (cu->state == S_OPENING && cu->playing && ref->vn == strlen(cu->playing->name)
        && memcmp(ref->v, cu->playing->name, ref->vn) == 0) {
      snprintf(detail, sizeof detail, "%s: %s", code, message);
      session_failed(cu, e->causes[CAUSE_NOT_ACCEPTED], detail);  /* the open was refused */
      return;
    }
  }
  out_event(e, "%s error: %s: %s", who_of(c), code, message);
}

/* str() of a JSON value as Python prints the decoded one (ids: str(frame.get("id"))). */
static void py_str_of(const field *fl, buf *out) {
  out->n = 0;
  if (fl == NULL || (fl->what == J_OTHER && fl->vn == 4 && !memcmp(fl->v, "null", 4))) { buf_str(out, "None"); return; }
  if (fl->what == J_OTHER && fl->vn == 4 && !memcmp(fl->v, "true", 4)) { buf_str(out, "True"); return; }
  if (fl->what == J_OTHER && fl->vn == 5 && !memcmp(fl->v, "false", 5)) { buf_str(out, "False"); return; }
  if (fl->what == J_STR) {
    buf_need(out, fl->vn + 1);
    long k = unescape(fl->v, fl->vn, out->p);
    out->n = k < 0 ? 0 : (size_t)k;
    return;
  }
  buf_put(out, fl->v, fl->vn);
}

static void on_ack_frame(conn *c, const field *f, int n) {
  engine *e = c->e;
  const field *cid = GET(f, n, "client_msg_id");
  if (cid == NULL || cid->what != J_STR) return;
  pending *p = pending_find(c, cid->v, cid->vn);
  if (p == NULL) return;  /* acked before (a resend's second ack) */
  py_str_of(GET(f, n, "id"), &e->scratch);
  out_ack(e, p->conversation, p->seq, mono_us(), e->scratch.p ? e->scratch.p : "", e->scratch.n);
  pending_done(p);
}

/* 1: a push seen for the first time (or one without an integer id); 0: a duplicate. */
static int first_push(conn *c, const field *id_field) {
  int64_t id;
  if (!int_of(id_field, &id)) return 1;
  if (!seen_first_time(&c->seen, (uint64_t)id ^ 0x8000000000000000ULL)) return 0;
  if (!c->has_last_id || id > c->last_id) { c->last_id = id; c->has_last_id = 1; }
  return 1;
}

/* The text of a pushed message, unescaped into e->text; 0 if it has none. */
static int pushed_text(engine *e, const field *f, int n, size_t *len) {
  const field *text = GET(f, n, "text");
  if (text == NULL || text->what != J_STR) return 0;
  buf_need(&e->text, text->vn + 1);  /* unescaped, a text is never longer */
  long k = unescape(text->v, text->vn, e->text.p);
  if (k < 0) return 0;
  *len = (size_t)k;
  return 1;
}

/* A pushed message's stamp; 0 for a push seen before, one without a text, or no stamp. */
static int pushed_stamp(conn *c, const field *f, int n, stamp *s) {
  size_t tn;
  if (!first_push(c, GET(f, n, "id")) || !pushed_text(c->e, f, n, &tn)) return 0;
  return parse_stamp(c->e, c->e->text.p, tn, s);
}

static void agent_message(conn *c, const field *f, int n) {
  engine *e = c->e;
  agent *a = c->owner;
  int64_t received = mono_us();
  stamp s;
  if (!pushed_stamp(c, f, n, &s)) return;
  if (s.foreign) { e->local_foreign++; return; }
  if (!s.valid) { e->local_forged++; return; }
  out_receipt(e, s.conv, s.conv_n, s.seq, a->id, received);
  if (s.seq <= 0 || s.seq >= 64 || e->reply_kind[s.seq] == NULL) return;
  /* a duplicate of a question already answered: a person answers once */
  if (!seen_first_time(&e->replied, hash_bytes(s.conv, s.conv_n, (uint64_t)s.seq))) return;
  int64_t conversation_id = 0;
  if (!int_of(GET(f, n, "conversation"), &conversation_id)) conversation_id = 0;
  /* the answer is a stamped message of its own, planned for the question's arrival */
  buf *rc = &e->scratch; rc->n = 0;
  buf_put(rc, s.conv, s.conv_n); buf_put(rc, ">r", 2);
  out_send(e, a->sender, rc->p, rc->n, s.seq, received, mono_us(), e->reply_kind[s.seq]);
  buf *fb = &e->frame; fb->n = 0;
  buf_str(fb, "{\"type\":\"reply\",\"conversation\":"); buf_int(fb, conversation_id);
  buf_str(fb, ",\"client_msg_id\":");
  size_t id_start = fb->n + 1;
  buf *id = &e->stamped;  /* the client id first, then (below) the stamped text */
  id->n = 0;
  buf_str(id, e->run); buf_str(id, "-r-"); buf_put(id, s.conv, s.conv_n); buf_put(id, "-", 1); buf_int(id, s.seq);
  buf_json(fb, id->p, id->n);
  size_t id_end = fb->n - 1;
  buf_str(fb, ",\"text\":");
  const char *body = e->replies[s.seq % 3];
  e->stamped.n = 0;
  stamp_into(e, &e->stamped, body, strlen(body), a->sender, strlen(a->sender), rc->p, rc->n, s.seq, received);
  buf_json(fb, e->stamped.p, e->stamped.n);
  buf_str(fb, "}");
  /* the id went through buf_json: it has no character JSON escapes (run, ids, digits) */
  pending_add(c, fb->p, fb->n, fb->p + id_start, id_end - id_start, a->id, rc->p, rc->n, s.seq);
  ws_text(c, fb->p, fb->n);
}

static void customer_message(conn *c, const field *f, int n) {
  engine *e = c->e;
  customer *cu = c->owner;
  int64_t received = mono_us();
  stamp s;
  /* only answers to this customer's own conversations count */
  if (!pushed_stamp(c, f, n, &s) || s.foreign || !s.valid || s.conv_n < 2
      || memcmp(s.conv + s.conv_n - 2, ">r", 2) != 0) return;
  size_t base_n = s.conv_n - 2;
  for (int i = 0; i < cu->n_convs; i++) {
    conversation *cv = cu->convs[i];
    if (strlen(cv->name) != base_n || memcmp(cv->name, s.conv, base_n) != 0) continue;
    out_receipt(e, s.conv, s.conv_n, s.seq, cu->receiver, received);
    if (s.seq > 0 && s.seq < 64) cv->awaiting &= ~(1ULL << s.seq);
    if (cv->awaiting == 0 && cv->closing) conv_close(cu, cv);
    return;
  }
}

static void on_frame(conn *c, const char *p, size_t n) {
  engine *e = c->e;
  field f[16];
  int nf = scan_object(p, p + n, f, 16);
  const field *type = nf > 0 ? GET(f, nf, "type") : NULL;
  if (type == NULL || type->what != J_STR) {
    conn_lost(c, e->causes[CAUSE_PROTOCOL], "bad frame from target: not a JSON object with a string type");
    return;
  }
  if (c->state == C_HELLO) {
    if (is(type, "welcome")) on_welcome(c, f, nf);
    else if (is(type, "error")) on_error_frame(c, f, nf);
    else {
      char detail[200];
      snprintf(detail, sizeof detail, "expected welcome, got '%.*s'", (int)(type->vn < 64 ? type->vn : 64), type->v);
      conn_lost(c, e->causes[CAUSE_PROTOCOL], detail);
    }
    return;
  }
  if (is(type, "ack")) { on_ack_frame(c, f, nf); return; }
  if (is(type, "message")) { if (c->is_agent) agent_message(c, f, nf); else customer_message(c, f, nf); return; }
  if (is(type, "error")) { on_error_frame(c, f, nf); return; }
  if (!c->is_agent && is(type, "opened")) {
    customer *cu = c->owner;
    const field *ref = GET(f, nf, "ref");
    int64_t id;
    if (cu->state != S_OPENING || cu->playing == NULL || ref == NULL || ref->what != J_STR
        || ref->vn != strlen(cu->playing->name) || memcmp(ref->v, cu->playing->name, ref->vn) != 0) return;
    if (!int_of(GET(f, nf, "conversation"), &id)) {
      conn_lost(c, e->causes[CAUSE_PROTOCOL], "bad frame from target: 'opened' without an integer conversation");
      return;
    }
    timer_cancel(&e->timers, &cu->open_timer);
    round_t *r = cu->playing;
    cu->conversation_id = id;
    conv_new(cu, r->name, id);
    /* an on-time generator could send no sooner than the round's start plus the target's time */
    cu->earliest = r->start_us + mono_us() - cu->asked;
    if (r->n == 0) { round_over(cu); return; }
    cu->state = S_SENDING;
    timer_arm(&e->timers, &cu->send_timer, r->plan[0].at);
    return;
  }
  /* status, assigned, closed, pong, presence: nothing the swarm counts */
}

/* ---- the loop thread ---- */

static void lag_tick(timer *t) {
  engine *e = CONTAINER(t, engine, lag_timer);
  int64_t now = mono_us(), lag = now - t->at;
  if (lag > e->local_loop_lag) e->local_loop_lag = lag;
  timer_arm(&e->timers, t, now + 100000);
}

static void customer_free_state(engine *e, customer *cu) {
  /* a gone customer's leftovers: no timer of it may stay in the heap */
  heap *h = &e->timers;
  timer_cancel(h, &cu->send_timer); timer_cancel(h, &cu->open_timer); timer_cancel(h, &cu->next_round);
  cu->c.closing = 1;
  fail_pending(&cu->c, e->causes[CAUSE_DISCONNECTED], "the session was closed");
  conn_abort(&cu->c);
  seen_free(&cu->c.seen);
  while (cu->n_convs) conv_remove(cu, cu->n_convs - 1);
  free(cu->convs);
  round_free(cu->playing);
  while (cu->queue) { round_t *r = cu->queue; cu->queue = r->next; round_free(r); }
  free(cu->name); free(cu->receiver); free(cu->dead_detail);
  buf_free(&cu->c.in); buf_free(&cu->c.out); buf_free(&cu->c.frag);
  memset(cu, 0, sizeof *cu);
}

static customer *customer_get(engine *e, long index, const char *name) {
  if (index >= e->cap_customers) {
    long cap = e->cap_customers ? e->cap_customers : 256;
    while (cap <= index) cap *= 2;
    e->customers = realloc(e->customers, (size_t)cap * sizeof(customer *));
    if (e->customers == NULL) abort();
    memset(e->customers + e->cap_customers, 0, (size_t)(cap - e->cap_customers) * sizeof(customer *));
    e->cap_customers = cap;
  }
  customer *cu = e->customers[index];
  if (cu != NULL && cu->state != S_GONE) return cu;
  if (cu == NULL) {
    cu = calloc(1, sizeof *cu);
    if (cu == NULL) abort();
    e->customers[index] = cu;
  } else customer_free_state(e, cu);  /* the same user number back after it left */
  cu->e = e;
  cu->name = strdup(name);
  size_t rn = strlen(name) + 10;
  cu->receiver = malloc(rn);
  if (cu->name == NULL || cu->receiver == NULL) abort();
  snprintf(cu->receiver, rn, "customer:%s", name);
  conn_init(e, &cu->c, 0, cu);
  cu->send_timer.pos = cu->open_timer.pos = cu->next_round.pos = -1;
  cu->send_timer.fire = send_due; cu->open_timer.fire = open_timed_out; cu->next_round.fire = next_round_due;
  cu->state = S_IDLE;
  cu->number = index;
  list_customer(cu, 1);
  return cu;
}

static void take_handovers(engine *e) {
  uint64_t count;
  if (read(e->wakefd, &count, sizeof count) < 0) { /* nothing pending: fine */ }
  pthread_mutex_lock(&e->lock);
  handover *h = e->in_head;
  e->in_head = e->in_tail = NULL;
  pthread_mutex_unlock(&e->lock);
  while (h) {
    handover *next = h->next;
    if (h->round == NULL) {
      customer *cu = (h->customer < e->cap_customers) ? e->customers[h->customer] : NULL;
      if (cu && cu->state != S_GONE && !cu->leaving) {
        /* the round in play ends now; what is queued never happens (WorkerEngine.leave) */
        cu->leaving = 1;
        while (cu->queue) { round_t *r = cu->queue; cu->queue = r->next; round_free(r); }
        cu->queue_tail = NULL;
        timer_cancel(&e->timers, &cu->next_round);
        if (cu->playing && cu->state == S_SENDING) round_over(cu);
        else if (cu->playing == NULL) customer_next_round(cu);
      }
    } else {
      customer *cu = customer_get(e, h->customer, h->name);
      list_customer(cu, 1);
      h->round->next = NULL;
      if (cu->queue_tail) cu->queue_tail->next = h->round; else cu->queue = h->round;
      cu->queue_tail = h->round;
      customer_next_round(cu);
    }
    free(h->name);
    free(h);
    h = next;
  }
}

#define LOOP_NICENESS 5

static void *loop_main(void *arg) {
  engine *e = arg;
  struct epoll_event events[512];
  /* Below the process's other threads when the machine is short of CPU: Locust's own thread
   * (heartbeats to the master, the users' plans, the batches) must keep its pace, or the
   * master counts the worker as missing and never tells it to stop. This thread then falls
   * behind its plan instead, which the run reports as the generator's own lateness. */
  if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), getpriority(PRIO_PROCESS, 0) + LOOP_NICENESS) != 0) {
    /* not allowed: the thread runs at the process's priority */
  }
  for (int i = 0; i < e->n_agents; i++) conn_start(&e->agents[i].c);
  take_handovers(e);  /* any handed over before the thread ran */
  flush_dirty(e);
  timer_arm(&e->timers, &e->lag_timer, mono_us() + 100000);
  for (;;) {
    pthread_mutex_lock(&e->lock);
    int stopping = e->stopping;
    pthread_mutex_unlock(&e->lock);
    if (stopping) break;
    int timeout = -1;
    if (e->timers.n) {
      int64_t wait = e->timers.items[0]->at - mono_us();
      /* whole milliseconds rounded up: a timer never fires early (see WorkerEngine._arm_due) */
      timeout = wait <= 0 ? 0 : (int)((wait + 999) / 1000);
    }
    int n = epoll_wait(e->epfd, events, 512, timeout);
    for (int i = 0; i < n; i++) {
      if (events[i].data.ptr == NULL) { take_handovers(e); continue; }
      conn *c = events[i].data.ptr;
      uint32_t ev = events[i].events;
      if (c->fd < 0) continue;
      if (ev & EPOLLOUT) on_writable(c);
      if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->state != C_CONNECTING) on_readable(c);
      else if (c->fd >= 0 && (ev & (EPOLLHUP | EPOLLERR)) && c->state == C_CONNECTING) on_writable(c);
    }
    int64_t now = mono_us();
    while (e->timers.n && e->timers.items[0]->at <= now) {
      timer *t = e->timers.items[0];
      timer_cancel(&e->timers, t);
      t->fire(t);
      now = mono_us();
    }
    flush_dirty(e);
    publish(e);
  }
  /* stopping: close every connection (the target sees each go) */
  for (long i = 0; i < e->cap_customers; i++) if (e->customers[i]) conn_close_fd(&e->customers[i]->c);
  for (int i = 0; i < e->n_agents; i++) conn_close_fd(&e->agents[i].c);
  publish(e);
  return NULL;
}

/* ---- the Python type ---- */

static int resolve(PyObject *address, struct sockaddr_storage *out, socklen_t *len) {
  /* address: bytes of a sockaddr (the wrapper packs it) */
  char *p; Py_ssize_t n;
  if (PyBytes_AsStringAndSize(address, &p, &n) < 0) return -1;
  if (n <= 0 || (size_t)n > sizeof *out) { PyErr_SetString(PyExc_ValueError, "bad socket address"); return -1; }
  memset(out, 0, sizeof *out);
  memcpy(out, p, (size_t)n);
  *len = (socklen_t)n;
  return 0;
}

static char *str_arg(PyObject *o) {  /* names and texts the engine keeps as C strings */
  Py_ssize_t n;
  const char *s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == NULL) return NULL;
  if (memchr(s, 0, (size_t)n) != NULL) {
    PyErr_SetString(PyExc_ValueError, "the compiled engine takes no NUL character in names");
    return NULL;
  }
  return dup_n(s, (size_t)n);
}

static void engine_dealloc(engine *e);

static int engine_init(engine *e, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"url", "address", "path", "host_header", "agent_url", "agent_address",
                          "agent_path", "agent_host_header", "shop", "client_version", "run", "secret",
                          "worker", "conn_prefix", "agents", "reply_kinds", "replies", "causes",
                          "deadline_us", "connect_timeout_us", "reconnect_window_us",
                          "late_send_us", "heartbeat_us", "heartbeat_timeout_us", NULL};
  PyObject *url, *agent_url, *address, *path, *host_header, *agent_address, *agent_path, *agent_host_header,
      *shop, *client_version, *run, *worker, *conn_prefix, *agents, *reply_kinds, *replies, *causes;
  Py_buffer secret;
  long long deadline_us, connect_timeout_us, reconnect_window_us, late_send_us, heartbeat_us, heartbeat_timeout_us;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "USUUUSUUUUUy*UUO!O!O!O!LLLLLL", names, &url, &address, &path,
                                   &host_header, &agent_url, &agent_address, &agent_path, &agent_host_header,
                                   &shop, &client_version, &run, &secret, &worker, &conn_prefix,
                                   &PyList_Type, &agents, &PyDict_Type, &reply_kinds,
                                   &PyTuple_Type, &replies, &PyTuple_Type, &causes,
                                   &deadline_us, &connect_timeout_us, &reconnect_window_us,
                                   &late_send_us, &heartbeat_us, &heartbeat_timeout_us))
    return -1;
  if (e->path != NULL) { PyBuffer_Release(&secret); PyErr_SetString(PyExc_RuntimeError, "already initialised"); return -1; }
  int ok = resolve(address, &e->addr, &e->addrlen) == 0 && resolve(agent_address, &e->agent_addr, &e->agent_addrlen) == 0;
  if (ok && (secret.len < 8 || secret.len > 64)) { PyErr_SetString(PyExc_ValueError, "secret must be 8 to 64 bytes"); ok = 0; }
  if (ok) b2b_init(&e->keyed, 6, secret.buf, (size_t)secret.len);
  PyBuffer_Release(&secret);
  if (!ok) return -1;
  if (!(e->url = str_arg(url)) || !(e->agent_url = str_arg(agent_url)) || !(e->path = str_arg(path)) || !(e->host_header = str_arg(host_header)) || !(e->agent_path = str_arg(agent_path))
      || !(e->agent_host_header = str_arg(agent_host_header)) || !(e->shop = str_arg(shop))
      || !(e->client_version = str_arg(client_version)) || !(e->run = str_arg(run))
      || !(e->worker = str_arg(worker)) || !(e->conn_prefix = str_arg(conn_prefix))) return -1;
  if (PyTuple_GET_SIZE(replies) != 3 || PyTuple_GET_SIZE(causes) != 8) {
    PyErr_SetString(PyExc_ValueError, "replies: 3 texts; causes: 8 names"); return -1;
  }
  for (int i = 0; i < 3; i++) if (!(e->replies[i] = str_arg(PyTuple_GET_ITEM(replies, i)))) return -1;
  for (int i = 0; i < 8; i++) if (!(e->causes[i] = str_arg(PyTuple_GET_ITEM(causes, i)))) return -1;
  PyObject *key, *value; Py_ssize_t pos = 0;
  while (PyDict_Next(reply_kinds, &pos, &key, &value)) {
    long seq = PyLong_AsLong(key);
    if (seq <= 0 || seq >= 64) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "reply seq must be 1-63"); return -1; }
    if (!(e->reply_kind[seq] = str_arg(value))) return -1;
  }
  e->n_agents = (int)PyList_GET_SIZE(agents);
  e->agents = calloc((size_t)e->n_agents + 1, sizeof(agent));
  if (e->agents == NULL) { PyErr_NoMemory(); return -1; }
  for (int i = 0; i < e->n_agents; i++) {
    PyObject *item = PyList_GET_ITEM(agents, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) { PyErr_SetString(PyExc_TypeError, "agents: (id, token, sender) tuples"); return -1; }
    agent *a = &e->agents[i];
    a->e = e;
    if (!(a->id = str_arg(PyTuple_GET_ITEM(item, 0))) || !(a->token = str_arg(PyTuple_GET_ITEM(item, 1)))
        || !(a->sender = str_arg(PyTuple_GET_ITEM(item, 2)))) return -1;
  }
  e->deadline_us = deadline_us; e->connect_timeout_us = connect_timeout_us;
  e->reconnect_window_us = reconnect_window_us; e->late_send_us = late_send_us;
  e->heartbeat_us = heartbeat_us; e->heartbeat_timeout_us = heartbeat_timeout_us;
  e->replied.limit = SEEN_LIMIT;
  if (getrandom(&e->mask_state, sizeof e->mask_state, 0) != (ssize_t)sizeof e->mask_state || e->mask_state == 0)
    e->mask_state = 0x9E3779B9u;
  e->lag_timer.pos = -1; e->lag_timer.fire = lag_tick;
  e->epfd = e->wakefd = -1;
  pthread_mutex_init(&e->lock, NULL);
  return 0;
}

static PyObject *engine_start(engine *e, PyObject *unused) {
  (void)unused;
  if (e->path == NULL || e->thread_started) { PyErr_SetString(PyExc_RuntimeError, "not initialised, or started already"); return NULL; }
  e->epfd = epoll_create1(EPOLL_CLOEXEC);
  e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (e->epfd < 0 || e->wakefd < 0) return PyErr_SetFromErrno(PyExc_OSError);
  e->fds_open = 1;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev);
  for (int i = 0; i < e->n_agents; i++) conn_init(e, &e->agents[i].c, 1, &e->agents[i]);
  if (pthread_create(&e->thread, NULL, loop_main, e) != 0) return PyErr_SetFromErrno(PyExc_OSError);
  e->thread_started = 1;
  Py_RETURN_NONE;
}

static void wake(engine *e) {
  uint64_t one = 1;
  if (write(e->wakefd, &one, sizeof one) < 0) { /* the counter is full: a wake is pending */ }
}

static void hand_over(engine *e, handover *h) {  /* to the loop thread, which wakes for it */
  pthread_mutex_lock(&e->lock);
  if (e->in_tail) e->in_tail->next = h; else e->in_head = h;
  e->in_tail = h;
  pthread_mutex_unlock(&e->lock);
  wake(e);
}

/* play_round(customer index, customer name, round name, channel, plan, drop_after, start_us) */
static PyObject *engine_play_round(engine *e, PyObject *args) {
  long index; PyObject *name, *round_name, *channel, *plan; int drop_after; long long start_us;
  if (!PyArg_ParseTuple(args, "lUUUO!iL", &index, &name, &round_name, &channel, &PyList_Type, &plan, &drop_after, &start_us))
    return NULL;
  if (index < 0) { PyErr_SetString(PyExc_ValueError, "customer index must be >= 0"); return NULL; }
  round_t *r = calloc(1, sizeof *r);
  handover *h = calloc(1, sizeof *h);
  if (r == NULL || h == NULL) { free(r); free(h); return PyErr_NoMemory(); }
  r->n = (int)PyList_GET_SIZE(plan);
  r->plan = calloc((size_t)r->n + 1, sizeof(planned));
  r->drop_after = drop_after; r->start_us = start_us;
  if (r->plan == NULL || !(r->name = str_arg(round_name)) || !(r->channel = str_arg(channel)) || !(h->name = str_arg(name))) goto fail;
  for (int i = 0; i < r->n; i++) {
    PyObject *item = PyList_GET_ITEM(plan, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) { PyErr_SetString(PyExc_TypeError, "plan items: (at_us, kind, body)"); goto fail; }
    r->plan[i].at = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
    if (r->plan[i].at == -1 && PyErr_Occurred()) goto fail;
    Py_ssize_t bn;
    const char *body = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 2), &bn);
    if (body == NULL || !(r->plan[i].kind = str_arg(PyTuple_GET_ITEM(item, 1)))) goto fail;
    r->plan[i].body = dup_n(body, (size_t)bn); r->plan[i].body_n = (size_t)bn;
  }
  h->customer = index; h->round = r;
  hand_over(e, h);
  Py_RETURN_NONE;
fail:
  round_free(r); free(h->name); free(h);
  return NULL;
}

static PyObject *engine_leave(engine *e, PyObject *args) {
  long index;
  if (!PyArg_ParseTuple(args, "l", &index)) return NULL;
  handover *h = calloc(1, sizeof *h);
  if (h == NULL) return PyErr_NoMemory();
  h->customer = index;
  hand_over(e, h);
  Py_RETURN_NONE;
}

/* Records of one buffer as one flat list; layout: 's' string, 'i' integer. */
static PyObject *decode_records(const buf *b, const char *layout) {
  PyObject *list = PyList_New(0);
  if (list == NULL) return NULL;
  size_t at = 0;
  while (at < b->n) {
    for (const char *k = layout; *k; k++) {
      PyObject *item;
      if (*k == 's') {
        uint32_t len; memcpy(&len, b->p + at, 4); at += 4;
        item = PyUnicode_DecodeUTF8(b->p + at, len, "replace");
        at += len;
      } else {
        int64_t v; memcpy(&v, b->p + at, 8); at += 8;
        item = PyLong_FromLongLong(v);
      }
      if (item == NULL || PyList_Append(list, item) < 0) { Py_XDECREF(item); Py_DECREF(list); return NULL; }
      Py_DECREF(item);
    }
  }
  return list;
}

static PyObject *engine_take(engine *e, PyObject *unused) {
  (void)unused;
  buf sends, acks, receipts, events;
  pthread_mutex_lock(&e->lock);
  sends = e->sends; acks = e->acks; receipts = e->receipts; events = e->events;
  memset(&e->sends, 0, sizeof(buf)); memset(&e->acks, 0, sizeof(buf));
  memset(&e->receipts, 0, sizeof(buf)); memset(&e->events, 0, sizeof(buf));
  long long late = e->late_sends, forged = e->forged, foreign = e->foreign;
  long long send_lag = e->send_lag_max_us, loop_lag = e->loop_lag_max_us;
  /* counts since the last take, as WorkerEngine.take_batch sends them */
  e->late_sends = e->forged = e->foreign = e->send_lag_max_us = e->loop_lag_max_us = 0;
  pthread_mutex_unlock(&e->lock);
  PyObject *s = decode_records(&sends, "ssiiis"), *a = decode_records(&acks, "siis"),
           *r = decode_records(&receipts, "sisi"), *ev = decode_records(&events, "s");
  buf_free(&sends); buf_free(&acks); buf_free(&receipts); buf_free(&events);
  if (!s || !a || !r || !ev) { Py_XDECREF(s); Py_XDECREF(a); Py_XDECREF(r); Py_XDECREF(ev); return NULL; }
  return Py_BuildValue("(NNNNLLLLL)", s, a, r, ev, late, forged, foreign, send_lag, loop_lag);
}

static PyObject *engine_status(engine *e, PyObject *unused) {
  (void)unused;
  pthread_mutex_lock(&e->lock);
  int ready = e->agents_ready || e->n_agents == 0;
  PyObject *result = Py_BuildValue("(Ozzl)", ready ? Py_True : Py_False, e->failure, e->failure_cause,
                                   e->connected);
  pthread_mutex_unlock(&e->lock);
  return result;
}

static PyObject *engine_open_customers(engine *e, PyObject *unused) {
  (void)unused;
  PyObject *list = PyList_New(0);
  if (list == NULL) return NULL;
  pthread_mutex_lock(&e->lock);
  for (long i = 0; i < e->cap_alive; i++) {
    if (!e->alive[i]) continue;
    PyObject *n = PyLong_FromLong(i);
    if (n == NULL || PyList_Append(list, n) < 0) {
      Py_XDECREF(n); pthread_mutex_unlock(&e->lock); Py_DECREF(list); return NULL;
    }
    Py_DECREF(n);
  }
  pthread_mutex_unlock(&e->lock);
  return list;
}

static PyObject *engine_stop(engine *e, PyObject *unused) {
  (void)unused;
  if (!e->thread_started) Py_RETURN_NONE;
  pthread_mutex_lock(&e->lock); e->stopping = 1; pthread_mutex_unlock(&e->lock);
  wake(e);
  Py_BEGIN_ALLOW_THREADS
  pthread_join(e->thread, NULL);
  Py_END_ALLOW_THREADS
  e->thread_started = 0;
  Py_RETURN_NONE;
}

static void engine_dealloc(engine *e) {
  if (e->thread_started) {
    pthread_mutex_lock(&e->lock); e->stopping = 1; pthread_mutex_unlock(&e->lock);
    wake(e);
    pthread_join(e->thread, NULL);
  }
  /* the process usually ends with the engine: the memory goes with it, bar these */
  if (e->fds_open) { close(e->epfd); close(e->wakefd); }
  Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *stamp_text_py(engine *e, PyObject *args) {
  /* the engine's stamp, for tests: the same as chatprobe.stamp.StampCodec.stamp_text */
  const char *body, *sender, *conv; Py_ssize_t bn, sn, cn; int seq; long long intended;
  if (!PyArg_ParseTuple(args, "s#s#s#iL", &body, &bn, &sender, &sn, &conv, &cn, &seq, &intended)) return NULL;
  buf b = {0};
  stamp_into(e, &b, body, (size_t)bn, sender, (size_t)sn, conv, (size_t)cn, seq, intended);
  PyObject *result = PyUnicode_DecodeUTF8(b.p, (Py_ssize_t)b.n, "strict");
  buf_free(&b);
  return result;
}

/* For the fuzz tests: ``data`` arrives on an agent's (role 1) or a customer's (role 0)
 * connection, up (state 0) or waiting for its welcome (state 1), with no socket and no loop
 * thread; whatever it does is dropped. Returns the events it caused. */
static PyObject *feed_py(engine *e, PyObject *args) {
  int role, state; const char *data; Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "iiy#", &role, &state, &data, &n)) return NULL;
  if (e->thread_started || e->path == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "feed() is for an engine that was never started");
    return NULL;
  }
  conn *c;
  if (role == 1) {
    if (e->n_agents < 1) { PyErr_SetString(PyExc_ValueError, "no agent to feed"); return NULL; }
    c = &e->agents[0].c;
    if (c->e == NULL) conn_init(e, c, 1, &e->agents[0]);
  } else c = &customer_get(e, 0, "fuzz")->c;
  c->closing = 0;
  c->state = state == 1 ? C_HELLO : C_READY;
  c->ever_ready = 1;
  e->agents_ready_count = 0;
  buf_put(&c->in, data, (size_t)n);
  take_input(c, &c->in);
  /* nothing was sent anywhere: forget what it would have sent, and any reconnect it began */
  c->out.n = 0;
  timer_cancel(&e->timers, &c->step);
  if (c->fd >= 0) conn_close_fd(c);
  e->n_dirty = 0;
  PyObject *events = decode_records(&e->local_events, "s");
  e->local_sends.n = e->local_acks.n = e->local_receipts.n = e->local_events.n = 0;
  return events;
}

static PyObject *check_text_py(engine *e, PyObject *args) {
  /* for tests: (conversation, seq, valid, foreign) of a text's stamp, or None */
  const char *text; Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "s#", &text, &n)) return NULL;
  stamp s;
  if (!parse_stamp(e, text, (size_t)n, &s)) Py_RETURN_NONE;
  return Py_BuildValue("(s#iOO)", s.conv, (Py_ssize_t)s.conv_n, s.seq, s.valid ? Py_True : Py_False, s.foreign ? Py_True : Py_False);
}

static PyObject *unescape_py(PyObject *mod, PyObject *args) {
  /* for tests: a JSON string literal's inside, unescaped as the engine reads texts */
  (void)mod;
  const char *s; Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "s#", &s, &n)) return NULL;
  char *out = malloc((size_t)n + 1);
  if (out == NULL) return PyErr_NoMemory();
  long k = unescape(s, (size_t)n, out);
  PyObject *result = k < 0 ? Py_NewRef(Py_None) : PyUnicode_DecodeUTF8(out, k, "replace");
  free(out);
  return result;
}

static PyMethodDef engine_methods[] = {
  {"start", (PyCFunction)engine_start, METH_NOARGS, "Start the loop thread (agents log in)."},
  {"play_round", (PyCFunction)engine_play_round, METH_VARARGS, "Hand over one round."},
  {"leave", (PyCFunction)engine_leave, METH_VARARGS, "The customer leaves."},
  {"take", (PyCFunction)engine_take, METH_NOARGS, "Records and counters since the last take."},
  {"status", (PyCFunction)engine_status, METH_NOARGS,
   "(agents ready, failure, failure cause, customers logged in now)."},
  {"stop", (PyCFunction)engine_stop, METH_NOARGS, "Close everything and end the thread."},
  {"open_customers", (PyCFunction)engine_open_customers, METH_NOARGS,
   "Indexes of the customers whose connection is not closed for good."},
  {"stamp_text", (PyCFunction)stamp_text_py, METH_VARARGS, "A stamped text (for tests)."},
  {"check_text", (PyCFunction)check_text_py, METH_VARARGS, "A text's stamp (for tests)."},
  {"feed", (PyCFunction)feed_py, METH_VARARGS, "Bytes into a connection, no socket (for tests)."},
  {NULL, NULL, 0, NULL}};

static PyTypeObject EngineType = {
  PyVarObject_HEAD_INIT(NULL, 0)
  .tp_name = "chatprobe.swarm._fastref.Engine",
  .tp_basicsize = sizeof(engine),
  .tp_flags = Py_TPFLAGS_DEFAULT,
  .tp_doc = "The compiled swarm engine for the reference protocol (see fastref.py).",
  .tp_new = PyType_GenericNew,
  .tp_init = (initproc)engine_init,
  .tp_dealloc = (destructor)engine_dealloc,
  .tp_methods = engine_methods,
};

static PyMethodDef module_methods[] = {
  {"unescape", unescape_py, METH_VARARGS, "A JSON string's inside, unescaped (for tests)."},
  {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastref",
  "The compiled swarm engine for the reference protocol.", -1, module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastref(void) {
  if (PyType_Ready(&EngineType) < 0) return NULL;
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) { Py_DECREF(m); return NULL; }
  return m;
}

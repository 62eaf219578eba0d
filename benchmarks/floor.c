/* bench_floor.py's floor written in C: the same job (the shopper script's rounds on a plan,
 * every message acked, confirmed by a probe agent and 3 of them answered, stamps made and
 * checked with keyed BLAKE2b, a timer per open and per round's wait for answers, records kept
 * in memory) in one thread on epoll, against benchmarks/relay_server.py. A yardstick for what
 * a compiled engine would cost per message here, not part of chatprobe. bench_floor.py
 * builds it with the C compiler on the machine and feeds it on standard input:
 *   line 1: port users seconds warm_up_seconds run secret_hex reply_seq_mask late_send_us
 *   line 2: the probe agents' names, space separated
 *   line 3: the agents' three replies, tab separated
 *   then round plans: "R n", then n lines "offset_us<TAB>kind<TAB>body"
 * It prints one JSON line: {"per_s", "cpu_us", "late", "invalid", "receipts", "sends"}.
 * Anything unexpected (the relay closing, an open unanswered for 5 s) ends it with exit 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../chatprobe/swarm/blake2b.h"  /* the stamps' keyed hash, as the engine's */

static b2b_ctx keyed;  /* key absorbed, as StampCodec._keyed */
static void sign_hex(const char *s, size_t n, char *out12) {
  b2b_ctx c = keyed; uint8_t d[6];
  b2b_update(&c, s, n); b2b_final(&c, d);
  static const char hx[] = "0123456789abcdef";
  for (int i = 0; i < 6; i++) { out12[2 * i] = hx[d[i] >> 4]; out12[2 * i + 1] = hx[d[i] & 15]; }
}

/* ---- clock ---- */
static int64_t now_us(void) {
  struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- buffers ---- */
typedef struct { char *p; size_t n, cap; } buf;
static void buf_need(buf *b, size_t more) {
  if (b->n + more > b->cap) { b->cap = (b->n + more) * 2 + 256; b->p = realloc(b->p, b->cap); }
}
static void buf_put(buf *b, const void *s, size_t n) { buf_need(b, n); memcpy(b->p + b->n, s, n); b->n += n; }
static void buf_str(buf *b, const char *s) { buf_put(b, s, strlen(s)); }
static void buf_json_str(buf *b, const char *s, size_t n) {
  buf_need(b, n * 2 + 2); b->p[b->n++] = '"';
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\') { buf_need(b, 2 + n - i); b->p[b->n++] = '\\'; b->p[b->n++] = ch; }
    else if (ch < 0x20) { char e[8]; snprintf(e, 8, "\\u%04x", ch); buf_put(b, e, 6); }
    else { buf_need(b, 1 + n - i); b->p[b->n++] = ch; }
  }
  buf_need(b, 1); b->p[b->n++] = '"';
}

/* ---- plans ---- */
typedef struct { int64_t off; int kind; char *body; size_t len; } step;
typedef struct { int n; step *steps; } round_t;
static round_t *rounds; static int n_rounds;
static char *replies[3]; static size_t reply_len[3];
static unsigned reply_mask;  /* bit seq set: expects a reply */
static char run_id[65];

/* ---- connections ---- */
typedef struct conn conn;
typedef struct customer customer;
typedef struct agent agent;
struct conn {
  int fd; int upgraded; buf in, out; int is_agent; void *owner; int want_out; int waiting_out;
};
struct customer {
  conn c; char name[32]; int rounds; int round_no; int64_t plan_end, round_start, asked, earliest;
  int index; int awaiting; char round_name[48]; int64_t conversation; int heap_pos;
  int64_t due_at; int state;
};
enum { OPENING, SENDING, AWAITING_ANSWERS, BETWEEN_ROUNDS };
struct agent { conn c; char name[32]; };

static int epfd; static uint32_t rng_state = 2463534242u;
static uint32_t xr(void) { rng_state ^= rng_state << 13; rng_state ^= rng_state >> 17; rng_state ^= rng_state << 5; return rng_state; }

static conn **dirty; static int n_dirty, cap_dirty;
static void mark_dirty(conn *c) {
  if (c->want_out || c->waiting_out) return;
  c->want_out = 1;
  if (n_dirty == cap_dirty) { cap_dirty = cap_dirty * 2 + 64; dirty = realloc(dirty, cap_dirty * sizeof(conn *)); }
  dirty[n_dirty++] = c;
}
static void send_frame(conn *c, const char *payload, size_t n) {
  uint8_t hdr[14]; size_t h = 0;
  hdr[h++] = 0x81;
  if (n < 126) hdr[h++] = 0x80 | n;
  else if (n < 65536) { hdr[h++] = 0xFE; hdr[h++] = n >> 8; hdr[h++] = n & 0xFF; }
  else { hdr[h++] = 0xFF; for (int i = 7; i >= 0; i--) hdr[h++] = (n >> (8 * i)) & 0xFF; }
  uint32_t m = xr(); uint8_t mask[4]; memcpy(mask, &m, 4);
  memcpy(hdr + h, mask, 4); h += 4;
  buf_need(&c->out, h + n);
  memcpy(c->out.p + c->out.n, hdr, h); c->out.n += h;
  uint8_t *dst = (uint8_t *)c->out.p + c->out.n;
  for (size_t i = 0; i < n; i++) dst[i] = payload[i] ^ mask[i & 3];
  c->out.n += n;
  mark_dirty(c);
}
static void flush_dirty(void) {
  for (int i = 0; i < n_dirty; i++) {
    conn *c = dirty[i]; c->want_out = 0;
    size_t at = 0;
    while (at < c->out.n) {
      ssize_t w = send(c->fd, c->out.p + at, c->out.n - at, MSG_NOSIGNAL);
      if (w < 0) { if (errno == EINTR) continue; if (errno == EAGAIN) break; perror("send"); exit(1); }
      at += w;
    }
    if (at < c->out.n) {  /* the socket is full: the rest leaves when it can take more */
      memmove(c->out.p, c->out.p + at, c->out.n - at); c->out.n -= at;
      struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
      epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
      c->waiting_out = 1;
      continue;
    }
    c->out.n = 0;
  }
  n_dirty = 0;
}

/* ---- timer heap of customers ---- */
static customer **heap; static int heap_n;
static void heap_swap(int i, int j) { customer *t = heap[i]; heap[i] = heap[j]; heap[j] = t; heap[i]->heap_pos = i; heap[j]->heap_pos = j; }
static void heap_up(int i) { while (i > 0) { int p = (i - 1) / 2; if (heap[p]->due_at <= heap[i]->due_at) break; heap_swap(i, p); i = p; } }
static void heap_down(int i) { for (;;) { int l = 2 * i + 1, r = l + 1, s = i; if (l < heap_n && heap[l]->due_at < heap[s]->due_at) s = l; if (r < heap_n && heap[r]->due_at < heap[s]->due_at) s = r; if (s == i) break; heap_swap(i, s); i = s; } }
static void schedule(customer *cu, int64_t at) {
  cu->due_at = at;
  if (cu->heap_pos >= 0) { heap_up(cu->heap_pos); heap_down(cu->heap_pos); return; }
  cu->heap_pos = heap_n; heap[heap_n++] = cu; heap_up(heap_n - 1);
}
static void heap_remove(customer *cu) {
  int i = cu->heap_pos; cu->heap_pos = -1; heap_n--;
  if (i < heap_n) { heap[i] = heap[heap_n]; heap[i]->heap_pos = i; heap_up(i); heap_down(heap[i]->heap_pos); }
}
static customer *heap_pop(void) {
  customer *top = heap[0]; top->heap_pos = -1; heap_n--;
  if (heap_n > 0) { heap[0] = heap[heap_n]; heap[0]->heap_pos = 0; heap_down(0); }
  return top;
}

/* ---- records ---- */
typedef struct { int64_t a, b; int32_t seq, kind; } rec;
static rec *recs; static size_t n_recs, cap_recs;
static int64_t sends_count, late_count, invalid_count, receipts_count;
static void record(int64_t a, int64_t b, int seq, int kind) {
  if (n_recs == cap_recs) { cap_recs = cap_recs * 2 + 4096; recs = realloc(recs, cap_recs * sizeof(rec)); }
  recs[n_recs++] = (rec){a, b, seq, kind};
}

/* ---- JSON: flat object scanning ---- */
typedef struct { const char *k; size_t kn; const char *v; size_t vn; int is_str; } kv;
/* Scan a string starting after '"'; returns pointer after closing quote. */
static const char *skip_str(const char *p, const char *e) {
  while (p < e) { if (*p == '\\') p += 2; else if (*p == '"') return p + 1; else p++; }
  return NULL;
}
static int scan_object(const char *p, const char *e, kv *out, int max) {
  int n = 0;
  while (p < e && *p != '{') p++;
  p++;
  while (p < e) {
    while (p < e && (*p == ' ' || *p == ',')) p++;
    if (p >= e || *p == '}') break;
    if (*p != '"') return -1;
    const char *k = p + 1; p = skip_str(k, e); if (!p) return -1;
    size_t kn = p - 1 - k;
    while (p < e && (*p == ' ' || *p == ':')) p++;
    const char *v = p; int is_str = 0;
    if (*p == '"') { is_str = 1; v = p + 1; p = skip_str(v, e); if (!p) return -1; }
    else if (*p == '{' || *p == '[') {
      int depth = 0;
      while (p < e) { if (*p == '"') { p = skip_str(p + 1, e); if (!p) return -1; continue; }
        if (*p == '{' || *p == '[') depth++; else if (*p == '}' || *p == ']') { depth--; if (depth == 0) { p++; break; } }
        p++; }
    } else { while (p < e && *p != ',' && *p != '}') p++; }
    if (n < max) { out[n].k = k; out[n].kn = kn; out[n].v = v; out[n].vn = is_str ? (size_t)(p - 1 - v) : (size_t)(p - v); out[n].is_str = is_str; n++; }
  }
  return n;
}
static const kv *get(const kv *f, int n, const char *key) {
  size_t kl = strlen(key);
  for (int i = 0; i < n; i++) if (f[i].kn == kl && memcmp(f[i].k, key, kl) == 0) return &f[i];
  return NULL;
}
static int hexval(char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; }
static size_t unescape(const char *s, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] != '\\') { out[o++] = s[i]; continue; }
    char c = s[++i];
    switch (c) {
      case 'n': out[o++] = '\n'; break; case 't': out[o++] = '\t'; break;
      case 'r': out[o++] = '\r'; break; case 'b': out[o++] = '\b'; break;
      case 'f': out[o++] = '\f'; break;
      case 'u': {
        unsigned cp = 0; for (int j = 0; j < 4; j++) cp = cp * 16 + hexval(s[i + 1 + j]); i += 4;
        if (cp >= 0xD800 && cp < 0xDC00 && s[i + 1] == '\\' && s[i + 2] == 'u') {
          unsigned lo = 0; for (int j = 0; j < 4; j++) lo = lo * 16 + hexval(s[i + 3 + j]); i += 6;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp < 0x80) out[o++] = cp;
        else if (cp < 0x800) { out[o++] = 0xC0 | (cp >> 6); out[o++] = 0x80 | (cp & 63); }
        else if (cp < 0x10000) { out[o++] = 0xE0 | (cp >> 12); out[o++] = 0x80 | ((cp >> 6) & 63); out[o++] = 0x80 | (cp & 63); }
        else { out[o++] = 0xF0 | (cp >> 18); out[o++] = 0x80 | ((cp >> 12) & 63); out[o++] = 0x80 | ((cp >> 6) & 63); out[o++] = 0x80 | (cp & 63); }
        break; }
      default: out[o++] = c;
    }
  }
  return o;
}

/* ---- stamps ---- */
static size_t stamp_text(char *out, const char *body, size_t bn, const char *sender,
                         const char *conversation, int seq, int64_t intended) {
  size_t n = 0;
  if (bn) { memcpy(out, body, bn); n = bn; out[n++] = ' '; }
  n += sprintf(out + n, "[cp:%s:%s:%s:%d:%llx:", run_id, sender, conversation, seq, (unsigned long long)intended);
  sign_hex(out, n, out + n); n += 12; out[n++] = ']';
  return n;
}
typedef struct { const char *conv; size_t conv_n; int seq; int valid; } parsed;
static int parse_stamp(const char *t, size_t n, parsed *ps) {
  const char *start = NULL;
  for (size_t i = n; i >= 4; i--) if (memcmp(t + i - 4, "[cp:", 4) == 0) { start = t + i - 4; break; }
  if (!start) return 0;
  const char *end = memchr(start, ']', t + n - start); if (!end) return 0;
  const char *parts[6]; size_t lens[6]; int k = 0; const char *p = start + 4;
  while (k < 6) { const char *c = memchr(p, ':', end - p); if (!c) c = end; parts[k] = p; lens[k] = c - p; k++; p = c + 1; if (c == end) break; }
  if (k != 6) return 0;
  ps->conv = parts[2]; ps->conv_n = lens[2]; ps->seq = atoi(parts[3]);
  if (lens[0] != strlen(run_id) || memcmp(parts[0], run_id, lens[0])) { ps->valid = 0; return 1; }
  char sig[12]; sign_hex(t, parts[5] - t, sig);
  ps->valid = (end == t + n - 1) && lens[5] == 12 && memcmp(sig, parts[5], 12) == 0;
  return 1;
}

/* ---- behaviour ---- */
static int64_t stop_at, late_send_us;
static char textbuf[65536], unesc[65536];
static buf frame;

static void start_round(customer *cu) {
  cu->rounds++;
  cu->asked = now_us();
  cu->round_start = cu->plan_end;
  cu->round_no = xr() % n_rounds;
  round_t *r = &rounds[cu->round_no];
  cu->plan_end = cu->round_start + r->steps[r->n - 1].off;
  cu->index = 0;
  snprintf(cu->round_name, sizeof cu->round_name, "w1%s-%d", cu->name, cu->rounds);
  cu->state = OPENING;
  schedule(cu, cu->asked + 5000000);  /* the open's answer timer, as the floor's */
  frame.n = 0;
  buf_str(&frame, "{\"type\":\"open\",\"ref\":\""); buf_str(&frame, cu->round_name);
  buf_str(&frame, "\",\"channel\":\"web\"}");
  send_frame(&cu->c, frame.p, frame.n);
}
static void close_round(customer *cu) {
  frame.n = 0;
  char tmp[64]; snprintf(tmp, 64, "{\"type\":\"close\",\"conversation\":%lld}", (long long)cu->conversation);
  buf_str(&frame, tmp);
  send_frame(&cu->c, frame.p, frame.n);
  int64_t t = now_us();
  cu->state = BETWEEN_ROUNDS;
  if (t < stop_at) schedule(cu, cu->plan_end > t ? cu->plan_end : t);
  else if (cu->heap_pos >= 0) heap_remove(cu);
}
static void send_next(customer *cu, int64_t now) {
  round_t *r = &rounds[cu->round_no];
  step *s = &r->steps[cu->index];
  int64_t intended = cu->round_start + s->off;
  int64_t base = intended > cu->earliest ? intended : cu->earliest;
  if (now - base > late_send_us) late_count++;
  int seq = cu->index + 1;
  sends_count++;
  record(intended, now, seq, s->kind);
  size_t tn = stamp_text(textbuf, s->body, s->len, cu->round_name, cu->round_name, seq, intended);
  if (reply_mask & (1u << seq)) cu->awaiting++;
  frame.n = 0;
  char tmp[256];
  snprintf(tmp, sizeof tmp, "{\"type\":\"send\",\"conversation\":%lld,\"client_msg_id\":\"%s-%s-%d\",\"text\":",
           (long long)cu->conversation, run_id, cu->round_name, seq);
  buf_str(&frame, tmp); buf_json_str(&frame, textbuf, tn); buf_str(&frame, "}");
  send_frame(&cu->c, frame.p, frame.n);
  cu->index++;
  if (cu->index < r->n) schedule(cu, cu->round_start + r->steps[cu->index].off);
  else if (cu->awaiting) { cu->state = AWAITING_ANSWERS; schedule(cu, now + 10000000); }
  else close_round(cu);
}
static void customer_frame(customer *cu, const char *p, size_t n) {
  kv f[12]; int nf = scan_object(p, p + n, f, 12);
  const kv *type = get(f, nf, "type"); if (!type) return;
  if (type->vn == 3 && !memcmp(type->v, "ack", 3)) {
    const kv *cid = get(f, nf, "client_msg_id"); const kv *id = get(f, nf, "id");
    const char *dash = cid->v + cid->vn; while (dash > cid->v && dash[-1] != '-') dash--;
    record(now_us(), strtoll(id->v, NULL, 10), atoi(dash), 100);
  } else if (type->vn == 7 && !memcmp(type->v, "message", 7)) {
    const kv *t = get(f, nf, "text");
    size_t tn = unescape(t->v, t->vn, unesc);
    parsed ps; if (!parse_stamp(unesc, tn, &ps) || !ps.valid) { invalid_count++; return; }
    receipts_count++;
    record(now_us(), 0, ps.seq, 101);
    cu->awaiting--;
    if (cu->awaiting == 0 && cu->state == AWAITING_ANSWERS) close_round(cu);
  } else if (type->vn == 6 && !memcmp(type->v, "opened", 6)) {
    cu->conversation = strtoll(get(f, nf, "conversation")->v, NULL, 10);
    cu->awaiting = 0;
    cu->earliest = cu->round_start + now_us() - cu->asked;
    cu->state = SENDING;
    schedule(cu, cu->round_start + rounds[cu->round_no].steps[0].off);
  }
}
static void agent_frame(agent *ag, const char *p, size_t n) {
  kv f[12]; int nf = scan_object(p, p + n, f, 12);
  const kv *type = get(f, nf, "type"); if (!type) return;
  if (type->vn == 7 && !memcmp(type->v, "message", 7)) {
    int64_t received = now_us();
    const kv *t = get(f, nf, "text");
    size_t tn = unescape(t->v, t->vn, unesc);
    parsed ps; if (!parse_stamp(unesc, tn, &ps) || !ps.valid) { invalid_count++; return; }
    receipts_count++;
    record(received, 0, ps.seq, 102);
    if (reply_mask & (1u << ps.seq)) {
      char conv[80]; memcpy(conv, ps.conv, ps.conv_n); memcpy(conv + ps.conv_n, ">r", 3);
      int which = ps.seq % 3;
      size_t rn = stamp_text(textbuf, replies[which], reply_len[which], ag->name, conv, ps.seq, received);
      record(received, now_us(), ps.seq, 103);
      sends_count++;
      const kv *cv = get(f, nf, "conversation");
      frame.n = 0;
      char tmp[200];
      snprintf(tmp, sizeof tmp, "{\"type\":\"reply\",\"conversation\":%.*s,\"client_msg_id\":\"%s-r-%.*s-%d\",\"text\":",
               (int)cv->vn, cv->v, run_id, (int)ps.conv_n, ps.conv, ps.seq);
      buf_str(&frame, tmp); buf_json_str(&frame, textbuf, rn); buf_str(&frame, "}");
      send_frame(&ag->c, frame.p, frame.n);
    }
  } else if (type->vn == 3 && !memcmp(type->v, "ack", 3)) {
    record(now_us(), strtoll(get(f, nf, "id")->v, NULL, 10), 0, 104);
  }
}
static void on_readable(conn *c) {
  for (;;) {
    buf_need(&c->in, 65536);
    ssize_t r = recv(c->fd, c->in.p + c->in.n, c->in.cap - c->in.n, 0);
    if (r < 0) { if (errno == EAGAIN) break; if (errno == EINTR) continue; perror("recv"); exit(1); }
    if (r == 0) { fprintf(stderr, "relay closed\n"); exit(1); }
    c->in.n += r;
    if ((size_t)r < c->in.cap - (c->in.n - r)) break;
  }
  size_t at = 0;
  if (!c->upgraded) {
    char *e = memmem(c->in.p, c->in.n, "\r\n\r\n", 4);
    if (!e) return;
    at = e + 4 - c->in.p; c->upgraded = 1;
  }
  const uint8_t *b = (const uint8_t *)c->in.p;
  while (c->in.n - at >= 2) {
    size_t len = b[at + 1] & 0x7F, h = 2;
    if (len == 126) { if (c->in.n - at < 4) break; len = (b[at + 2] << 8) | b[at + 3]; h = 4; }
    else if (len == 127) { if (c->in.n - at < 10) break; len = 0; for (int i = 0; i < 8; i++) len = (len << 8) | b[at + 2 + i]; h = 10; }
    if (c->in.n - at < h + len) break;
    const char *payload = c->in.p + at + h;
    if ((b[at] & 0x0F) == 1) {
      if (c->is_agent) agent_frame(c->owner, payload, len); else customer_frame(c->owner, payload, len);
    }
    at += h + len;
  }
  memmove(c->in.p, c->in.p + at, c->in.n - at); c->in.n -= at;
}

static void connect_conn(conn *c, int port) {
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(0x7F000001);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
  int one = 1; setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char req[256];
  int n = snprintf(req, sizeof req, "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n", port);
  if (write(c->fd, req, n) != n) { perror("write"); exit(1); }
  /* blocking read of the upgrade answer, then non-blocking */
  char resp[1024]; size_t got = 0;
  while (!memmem(resp, got, "\r\n\r\n", 4)) { ssize_t r = read(c->fd, resp + got, 1); if (r <= 0) { perror("read"); exit(1); } got += r; }
  c->upgraded = 1;
  fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static double cpu_s(void) {
  struct rusage u; getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6;
}

int main(void) {
  int port, users; double seconds, warmup; char secret_hex[129];
  static char line[1 << 16];
  if (!fgets(line, sizeof line, stdin)) return 2;
  long long late_us;
  if (sscanf(line, "%d %d %lf %lf %64s %128s %u %lld", &port, &users, &seconds, &warmup, run_id,
             secret_hex, &reply_mask, &late_us) != 8) { fprintf(stderr, "bad first line\n"); return 2; }
  late_send_us = late_us;
  uint8_t secret[64]; size_t sl = strlen(secret_hex) / 2;
  for (size_t i = 0; i < sl; i++) secret[i] = hexval(secret_hex[2 * i]) * 16 + hexval(secret_hex[2 * i + 1]);
  b2b_init(&keyed, 6, secret, sl);
  if (!fgets(line, sizeof line, stdin)) return 2;
  char *agent_names[16]; int n_agents = 0;
  for (char *t = strtok(line, " \n"); t; t = strtok(NULL, " \n")) agent_names[n_agents++] = strdup(t);
  if (!fgets(line, sizeof line, stdin)) return 2;
  { char *t = strtok(line, "\t\n"); for (int i = 0; i < 3 && t; i++, t = strtok(NULL, "\t\n")) { replies[i] = strdup(t); reply_len[i] = strlen(t); } }
  int cap = 0;
  while (fgets(line, sizeof line, stdin)) {
    int n; if (sscanf(line, "R %d", &n) != 1) continue;
    if (n_rounds == cap) { cap = cap * 2 + 64; rounds = realloc(rounds, cap * sizeof(round_t)); }
    round_t *r = &rounds[n_rounds++]; r->n = n; r->steps = calloc(n, sizeof(step));
    for (int i = 0; i < n; i++) {
      if (!fgets(line, sizeof line, stdin)) return 2;
      char *a = strtok(line, "\t"), *k = strtok(NULL, "\t"), *body = strtok(NULL, "\n");
      r->steps[i].off = atoll(a); r->steps[i].kind = atoi(k);
      r->steps[i].body = strdup(body ? body : ""); r->steps[i].len = strlen(r->steps[i].body);
    }
  }
  epfd = epoll_create1(0);
  agent *agents = calloc(n_agents, sizeof(agent));
  for (int i = 0; i < n_agents; i++) {
    agents[i].c.is_agent = 1; agents[i].c.owner = &agents[i]; strcpy(agents[i].name, agent_names[i]);
    connect_conn(&agents[i].c, port);
    frame.n = 0; buf_str(&frame, "{\"type\":\"hello\",\"role\":\"agent\",\"agent\":\"");
    buf_str(&frame, agents[i].name); buf_str(&frame, "\"}");
    send_frame(&agents[i].c, frame.p, frame.n);
  }
  customer *cs = calloc(users, sizeof(customer));
  heap = calloc(users, sizeof(customer *));
  for (int i = 0; i < users; i++) {
    customer *cu = &cs[i]; cu->c.owner = cu; cu->heap_pos = -1;
    snprintf(cu->name, sizeof cu->name, "c%d", i);
    connect_conn(&cu->c, port);
    frame.n = 0; buf_str(&frame, "{\"type\":\"hello\",\"role\":\"customer\",\"customer\":\"");
    buf_str(&frame, cu->name); buf_str(&frame, "\"}");
    send_frame(&cu->c, frame.p, frame.n);
  }
  flush_dirty();
  int64_t t0 = now_us();
  stop_at = t0 + (int64_t)((warmup + seconds + 1) * 1e6);
  for (int i = 0; i < users; i++) { cs[i].plan_end = now_us(); start_round(&cs[i]); }
  flush_dirty();
  int64_t measure_from = t0 + (int64_t)(warmup * 1e6), measure_to = measure_from + (int64_t)(seconds * 1e6);
  double cpu0 = 0; int64_t sent0 = 0, late0 = 0; int measuring = 0;
  struct epoll_event evs[256];
  for (;;) {
    int64_t now = now_us();
    if (!measuring && now >= measure_from) { measuring = 1; cpu0 = cpu_s(); sent0 = sends_count; late0 = late_count; measure_from = now; }
    if (measuring && now >= measure_to) break;
    int timeout = 1000;
    if (heap_n) { int64_t w = heap[0]->due_at - now; timeout = w <= 0 ? 0 : (int)((w + 999) / 1000); }
    int n = epoll_wait(epfd, evs, 256, timeout);
    for (int i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if ((evs[i].events & EPOLLOUT) && c->waiting_out) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->waiting_out = 0;
        mark_dirty(c);
      }
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
    }
    now = now_us();
    while (heap_n && heap[0]->due_at <= now) {
      customer *cu = heap_pop();
      switch (cu->state) {
        case BETWEEN_ROUNDS: start_round(cu); break;
        case SENDING: send_next(cu, now); break;
        case AWAITING_ANSWERS: close_round(cu); break;
        default: fprintf(stderr, "the relay did not answer %s's open in 5 s\n", cu->round_name); return 1;
      }
    }
    flush_dirty();
  }
  double cpu1 = cpu_s(); int64_t t1 = now_us();
  double msgs = (double)(sends_count - sent0);
  printf("{\"per_s\": %.1f, \"cpu_us\": %.2f, \"late\": %lld, \"invalid\": %lld, \"receipts\": %lld, \"sends\": %lld}\n", msgs / ((t1 - measure_from) / 1e6),
         (cpu1 - cpu0) / msgs * 1e6, (long long)(late_count - late0), (long long)invalid_count, (long long)receipts_count, (long long)sends_count);
  return 0;
}

/*
 * mdeploy instruction counter: a QEMU TCG plugin (qemu-user, plugin API version 1+).
 *
 * Counts guest instructions with an inline add per executed translation block, and
 * snapshots the counter whenever the guest issues the marker syscall
 * lseek(-1, 0x6d647000 + code, SEEK_SET) (remote_main.py's _marker). At exit it writes
 * one line per marker, "code count", then "total count", to the file given as
 * outfile=PATH (or to QEMU's log). The counter is shared by all vCPUs (guest threads)
 * and is exact only for single-threaded work: mdeploy counts with threads=1.
 *
 * Build: gcc -shared -fPIC -O2 -I<dir with qemu/qemu-plugin.h> -o libinsn_count.so insn_count.c
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MARK_MAGIC 0x6d647000ULL
#define LSEEK_AARCH64 62
#define MAX_MARKS 65536

static uint64_t insns;
static uint64_t mark_count[MAX_MARKS];
static unsigned mark_code[MAX_MARKS];
static unsigned n_marks;
static char outfile[4096];

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns,
                                             qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    if (num == LSEEK_AARCH64 && (uint32_t)a1 == 0xffffffffu && (a2 & ~0xffULL) == MARK_MAGIC
        && n_marks < MAX_MARKS) {
        mark_code[n_marks] = (unsigned)(a2 & 0xff);
        mark_count[n_marks] = insns;
        n_marks++;
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    FILE *f = outfile[0] ? fopen(outfile, "w") : NULL;
    char line[64];
    for (unsigned i = 0; i <= n_marks; i++) {
        if (i < n_marks)
            snprintf(line, sizeof line, "%u %" PRIu64 "\n", mark_code[i], mark_count[i]);
        else
            snprintf(line, sizeof line, "total %" PRIu64 "\n", insns);
        if (f)
            fputs(line, f);
        else
            qemu_plugin_outs(line);
    }
    if (f)
        fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "outfile=", 8) == 0) {
            strncpy(outfile, argv[i] + 8, sizeof outfile - 1);
        } else {
            fprintf(stderr, "insn_count: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}

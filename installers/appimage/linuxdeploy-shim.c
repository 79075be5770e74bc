/*
 * Runs `musubi-linuxdeploy` (installers/appimage/linuxdeploy) beside this program with the same
 * arguments. scripts/desktop-bundle.sh builds it with cc and installs it under the name of the
 * linuxdeploy the Tauri bundler would download.
 *
 * Why a program and not the script itself: before running linuxdeploy, the bundler overwrites bytes
 * 8 to 10 of the file with zeros (where an AppImage keeps its magic, to hide it from desktop
 * integration tools). In a script those bytes are its "#!" line; in an ELF file they are padding.
 */
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    (void)argc;
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0) {
        perror("readlink /proc/self/exe");
        return 127;
    }
    self[n] = '\0';
    char script[PATH_MAX];
    snprintf(script, sizeof script, "%s/musubi-linuxdeploy", dirname(self));
    argv[0] = script;
    execv(script, argv);
    perror(script);
    return 127;
}
